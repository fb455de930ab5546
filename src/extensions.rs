//! Request-extension types that more than one module shares, in one neutral place so that
//! dependencies point one way (the module that inserts and the modules that read both depend on
//! this one). Who inserts and who reads each is listed in `app.rs`.

/// The peer address of the connection. Inserted by `server` for every request; read by the usage
/// layer for the record.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// An authenticated caller. Inserted by the auth layer; read by the client limit, the usage
/// record and the edits phases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub client: std::sync::Arc<str>,
    /// Index of the client in `config.clients`.
    pub index: usize,
}
