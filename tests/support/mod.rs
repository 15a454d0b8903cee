#![allow(dead_code)]
pub mod apache;
pub mod audit;
pub mod chaos;
pub mod chromium;
pub mod eas_driver;
pub mod haproxy;
pub mod lab;
pub mod ldif;
pub mod mapping_table;
pub mod nginx;
pub mod openssl_ca;
pub mod redis;
pub mod samba;
pub mod slapd;
pub mod sogo;
