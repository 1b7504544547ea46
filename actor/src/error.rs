#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    #[error(transparent)]
    Model(#[from] ril_model::ModelError),
    #[error("question {id}: {detail}")]
    Question { id: String, detail: String },
    #[error(transparent)]
    Sync(#[from] crate::sync::SyncError),
    #[error("{role} at {addr}: {detail}")]
    Peer {
        role: &'static str,
        addr: String,
        detail: String,
    },
    #[error(transparent)]
    Connect(#[from] ril_proto::server::ServeError),
    #[error("actor configuration: {0}")]
    Config(String),
}

impl ActorError {
    pub fn peer(role: &'static str, addr: &str, status: tonic::Status) -> Self {
        Self::Peer {
            role,
            addr: addr.to_string(),
            detail: format!("{:?}: {}", status.code(), status.message()),
        }
    }
}
