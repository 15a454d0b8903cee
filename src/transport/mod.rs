//! The bytes under HTTP: the TLS driver seg runs on both sides of a connection (devices
//! and `https://` upstreams), and the PROXY protocol header the L4 front puts first.

pub mod proxy_protocol;
pub mod tls_conn;
