//! The one convention at the RPC edge: every role's error type says what *kind* of failure it
//! is ([`ServiceError::error_code`]), and this module alone turns kinds into gRPC codes
//! ([`ServiceErrorCode::grpc_code`]) and errors into statuses ([`status`]). A client that gets a
//! status back keeps the peer, the call and the code ([`RpcError`]), so an error that crossed
//! the wire still says who failed, doing what.
//!
//! quickwit's `ServiceErrorCode` is the model: a role decides the kind of each of its errors
//! with an exhaustive match (no catch-all, so a new variant must be classified), and the table
//! from kinds to codes lives in one place.

use tonic::{Code, Status};

/// The kind of a service failure, as a client should act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceErrorCode {
    /// The request is wrong and sending it again will not help (`INVALID_ARGUMENT`).
    InvalidArgument,
    /// The thing asked for does not exist here (`NOT_FOUND`).
    NotFound,
    /// The request is valid but the run's state does not allow it now, e.g. a version published
    /// out of order (`FAILED_PRECONDITION`).
    FailedPrecondition,
    /// The caller is authenticated but may not make this call (`PERMISSION_DENIED`).
    PermissionDenied,
    /// The caller did not prove who it is (`UNAUTHENTICATED`).
    Unauthenticated,
    /// Not ready, shutting down, or a dependency is down: retry later (`UNAVAILABLE`).
    Unavailable,
    /// The work did not finish within its deadline (`DEADLINE_EXCEEDED`).
    DeadlineExceeded,
    /// A limit was hit (queue full, message too large) (`RESOURCE_EXHAUSTED`).
    ResourceExhausted,
    /// The service stopped part-way and will not take this again, e.g. the learner after a
    /// failed training step (`ABORTED`).
    Aborted,
    /// A fault of the service itself (`INTERNAL`).
    Internal,
}

impl ServiceErrorCode {
    /// The gRPC status code of this kind: the whole table.
    pub const fn grpc_code(self) -> Code {
        match self {
            Self::InvalidArgument => Code::InvalidArgument,
            Self::NotFound => Code::NotFound,
            Self::FailedPrecondition => Code::FailedPrecondition,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::Unavailable => Code::Unavailable,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::ResourceExhausted => Code::ResourceExhausted,
            Self::Aborted => Code::Aborted,
            Self::Internal => Code::Internal,
        }
    }

    /// The kind a received status code stands for (the inverse of [`Self::grpc_code`]; codes
    /// ril never sends map to the nearest kind).
    pub const fn from_grpc(code: Code) -> Self {
        match code {
            Code::InvalidArgument | Code::OutOfRange => Self::InvalidArgument,
            Code::NotFound => Self::NotFound,
            Code::FailedPrecondition | Code::AlreadyExists => Self::FailedPrecondition,
            Code::PermissionDenied => Self::PermissionDenied,
            Code::Unauthenticated => Self::Unauthenticated,
            Code::Unavailable | Code::Cancelled => Self::Unavailable,
            Code::DeadlineExceeded => Self::DeadlineExceeded,
            Code::ResourceExhausted => Self::ResourceExhausted,
            Code::Aborted => Self::Aborted,
            Code::Ok | Code::Unknown | Code::Unimplemented | Code::Internal | Code::DataLoss => {
                Self::Internal
            }
        }
    }

    /// Whether asking again later can succeed (the peer was busy, down or slow).
    pub const fn is_transient(self) -> bool {
        matches!(
            self,
            Self::Unavailable | Self::DeadlineExceeded | Self::ResourceExhausted
        )
    }
}

/// A role's error type, classified for the wire. Implement it with an exhaustive `match`.
pub trait ServiceError: std::error::Error {
    fn error_code(&self) -> ServiceErrorCode;
}

/// The status a server sends for `error`: the table's code and the error with its causes on
/// one line.
pub fn status<E: ServiceError>(error: &E) -> Status {
    Status::new(error.error_code().grpc_code(), source_chain(error))
}

/// `error: cause: cause`, for messages that must name the root problem on one line (a cause
/// already quoted by its parent is not repeated).
pub fn source_chain(e: &(dyn std::error::Error + '_)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A call to a peer that failed: which peer (its role and address), which call, and what it
/// answered. Roles keep this as the source of their own error variants, so that the top-level
/// error of a run names the peer and the call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{peer} at {addr}: {call} failed ({code:?}): {message}")]
pub struct RpcError {
    /// The peer's role ("coordinator", "teacher", ...).
    pub peer: &'static str,
    pub addr: String,
    /// The RPC, as the proto names it ("LeasePrompts").
    pub call: &'static str,
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(
        peer: &'static str,
        addr: impl Into<String>,
        call: &'static str,
        status: Status,
    ) -> Self {
        Self {
            peer,
            addr: addr.into(),
            call,
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// A failure on this side of the wire (the reply broke a rule of the protocol, a deadline
    /// passed before an answer), as the same error shape.
    pub fn local(
        peer: &'static str,
        addr: impl Into<String>,
        call: &'static str,
        code: Code,
        message: impl Into<String>,
    ) -> Self {
        Self {
            peer,
            addr: addr.into(),
            call,
            code,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ServiceErrorCode {
        ServiceErrorCode::from_grpc(self.code)
    }

    /// Whether asking again later can succeed.
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }

    /// Whether the caller cannot tell if the call took effect: the peer was unreachable, the
    /// deadline passed, or the connection broke (UNKNOWN, CANCELLED) after the request may have
    /// been delivered. Such a call is asked again with the same key, never given up silently.
    pub fn outcome_unknown(&self) -> bool {
        self.is_transient() || matches!(self.code, Code::Unknown | Code::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ServiceErrorCode; 10] = [
        ServiceErrorCode::InvalidArgument,
        ServiceErrorCode::NotFound,
        ServiceErrorCode::FailedPrecondition,
        ServiceErrorCode::PermissionDenied,
        ServiceErrorCode::Unauthenticated,
        ServiceErrorCode::Unavailable,
        ServiceErrorCode::DeadlineExceeded,
        ServiceErrorCode::ResourceExhausted,
        ServiceErrorCode::Aborted,
        ServiceErrorCode::Internal,
    ];

    #[test]
    fn every_kind_round_trips_through_its_grpc_code() {
        let mut codes = std::collections::HashSet::new();
        for kind in ALL {
            assert_eq!(ServiceErrorCode::from_grpc(kind.grpc_code()), kind);
            assert!(
                codes.insert(kind.grpc_code() as i32),
                "{kind:?} shares a code"
            );
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    impl ServiceError for Outer {
        fn error_code(&self) -> ServiceErrorCode {
            ServiceErrorCode::Unavailable
        }
    }

    #[test]
    fn a_status_carries_the_code_and_the_causes() {
        let s = status(&Outer(std::io::Error::other("disk gone")));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.message(), "outer: disk gone");
    }

    #[test]
    fn a_received_status_names_peer_call_and_code() {
        let e = RpcError::new(
            "teacher",
            "127.0.0.1:9",
            "Answer",
            Status::unavailable("still loading"),
        );
        assert_eq!(
            e.to_string(),
            "teacher at 127.0.0.1:9: Answer failed (Unavailable): still loading"
        );
        assert!(e.is_transient());
        assert!(!RpcError::new("d", "a", "Score", Status::invalid_argument("x")).is_transient());
    }
}
