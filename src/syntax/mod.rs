//! The syntax of values that the configuration and certificates name, parsed with nothing
//! else of seg: the `ldap:///` URLs AD CS writes for revocation lists, and IP networks.

pub mod ip_network;
pub mod ldap_url;
