//! How an error is shown to a person (the `lb` command's stderr, the control socket's answers):
//! its message, then each cause in its `source()` chain that the text so far does not already say.
//!
//! The rule, one for every error: a cause is printed once. lb's own messages carry their cause
//! (`"cannot read {path}: {source}"`), since they also travel as plain text over the control
//! socket, so the chain adds nothing to them; errors of other crates that leave their cause to
//! the chain (aya's "`bpf_link_create` failed") get it appended. Printing an anyhow chain with
//! `{:#}` would show lb's causes twice ("… (os error 2): … (os error 2)").

use std::error::Error;

/// `error`'s message followed by `": cause"` for each cause in its chain not yet in the text.
pub fn chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let said = cause.to_string();
        if !said.is_empty() && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[derive(Debug, thiserror::Error)]
    enum Carries {
        #[error("cannot read {path}: {source}")]
        Read { path: String, source: std::io::Error },
        #[error(transparent)]
        Inner(#[from] Leaves),
    }

    /// Like aya's `SyscallError`: the cause is left to the chain.
    #[derive(Debug, thiserror::Error)]
    #[error("`bpf_link_create` failed")]
    struct Leaves {
        #[source]
        io: std::io::Error,
    }

    fn missing() -> std::io::Error {
        std::fs::read("/nonexistent/lb-report-test").unwrap_err()
    }

    #[test]
    fn a_cause_in_the_message_is_not_repeated() {
        let e = Carries::Read {
            path: "/x".into(),
            source: missing(),
        };
        let text = chain(&e);
        assert_eq!(text, format!("cannot read /x: {}", missing()));
        // anyhow's alternate form, what `lb` printed before, says it twice.
        let any = anyhow::Error::from(e);
        assert_eq!(format!("{any:#}").matches("os error 2").count(), 2);
        assert_eq!(chain(any.as_ref()).matches("os error 2").count(), 1);
    }

    #[test]
    fn a_cause_left_to_the_chain_is_added_once() {
        let e = Carries::Inner(Leaves { io: missing() });
        assert_eq!(chain(&e), format!("`bpf_link_create` failed: {}", missing()));
        let any = anyhow::Error::from(e).context("attaching XDP");
        assert_eq!(
            chain(any.as_ref()),
            format!("attaching XDP: `bpf_link_create` failed: {}", missing())
        );
    }
}
