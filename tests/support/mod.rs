#![allow(dead_code)]
pub mod lab;
pub mod mapping_table;
pub mod samba;
pub mod slapd;
