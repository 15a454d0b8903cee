//! The upstream hop: connections to Exchange (or the identity-header backend), the pool
//! that keeps idle ones between exchanges, and the HTTP/1.1 exchange itself, run as a future
//! of the device connection's task.

pub mod conn;
pub mod exchange;
pub mod pool;
