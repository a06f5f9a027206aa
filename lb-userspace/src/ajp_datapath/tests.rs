//! In-process tests of the AJP datapath: fake AJP backends and a fake web tier on 127.0.0.1.
