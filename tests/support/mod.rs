#![allow(dead_code)]
pub mod lab;
pub mod slapd;
