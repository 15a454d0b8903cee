#![allow(dead_code)]
pub mod lab;
pub mod samba;
pub mod slapd;
