//! The error vocabulary of the request path: why a call into one stage
//! failed ([`StageError`]), and why an invocation failed as a caller sees it
//! ([`InvokeError`], one HTTP status and NATS error code each).

use crate::bindings::GuestError;
use wasmtime::Trap;

/// Why a call into a stage failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The guest rejected its input (a client error).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The guest reported an internal failure.
    #[error("internal error: {0}")]
    Internal(String),
    /// The guest ran past its deadline and was interrupted.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The guest trapped (panic, out of memory, bad instruction); the
    /// instance must be discarded.
    #[error("guest trapped: {0}")]
    Trap(String),
    /// No room in the host's instance pools for another instance now.
    #[error("{0}")]
    Capacity(String),
}

impl StageError {
    /// Whether the instance that produced this error may serve again.
    pub fn poisons_instance(&self) -> bool {
        matches!(self, StageError::DeadlineExceeded | StageError::Trap(_))
    }

    pub(crate) fn from_guest(error: GuestError) -> Self {
        match error {
            GuestError::InvalidInput(m) => StageError::InvalidInput(m),
            GuestError::Internal(m) => StageError::Internal(m),
        }
    }

    /// The trap as one log line: what trapped and the guest's own wasm
    /// backtrace (never the host's Rust backtrace, which `RUST_BACKTRACE`
    /// would otherwise add as 50 frames of generic host type names).
    pub(crate) fn from_trap(error: wasmtime::Error) -> Self {
        let what = match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => return StageError::DeadlineExceeded,
            Some(trap) => trap.to_string(),
            None => one_line(&error.root_cause().to_string()),
        };
        match error.downcast_ref::<wasmtime::WasmBacktrace>() {
            Some(backtrace) => StageError::Trap(format!(
                "{what}; wasm backtrace: {}",
                one_line(&backtrace.to_string())
            )),
            None => StageError::Trap(what),
        }
    }
}

/// Frames a trap's wasm backtrace shows in the log.
const BACKTRACE_FRAMES: usize = 12;

/// Multi-line text (a backtrace) as one line: `|` between its lines, the
/// first [`BACKTRACE_FRAMES`] kept.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.ends_with("wasm backtrace:"))
        .collect();
    let mut joined = lines
        .iter()
        .take(BACKTRACE_FRAMES)
        .copied()
        .collect::<Vec<_>>()
        .join(" | ");
    if lines.len() > BACKTRACE_FRAMES {
        joined.push_str(&format!(" | … {} more", lines.len() - BACKTRACE_FRAMES));
    }
    joined
}

/// Why an invocation failed; each maps to one HTTP status and NATS error code.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The function does not exist (404).
    #[error("function {0} is not published")]
    NotFound(String),
    /// The function's traffic split has no target with this tag (404).
    #[error("function {function} has no traffic target tagged {tag:?}")]
    UnknownTag {
        /// Function name.
        function: String,
        /// The tag asked for.
        tag: String,
    },
    /// The request body is over the function's limit (413).
    #[error("function {function}: body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Function name.
        function: String,
        /// The limit.
        limit: u64,
    },
    /// A stage rejected the input (400).
    #[error("function {function}, stage {stage}: {message}")]
    InvalidInput {
        /// Function name.
        function: String,
        /// Stage label.
        stage: String,
        /// The guest's message.
        message: String,
    },
    /// Every instance is busy and the queue is full (503).
    #[error("function {0} is overloaded; retry later")]
    Overloaded(String),
    /// The host's instance pools are full (503).
    #[error("function {function}, stage {stage}: {message}")]
    NoCapacity {
        /// Function name.
        function: String,
        /// Stage label.
        stage: String,
        /// What is full.
        message: String,
    },
    /// The function is stored but this host cannot serve it (503).
    #[error(
        "function {function} revision {revision} is published, but this host cannot serve it: {reason}"
    )]
    Unservable {
        /// Function name.
        function: String,
        /// The revision that could not be prepared.
        revision: u64,
        /// Why.
        reason: String,
    },
    /// The deadline passed (504).
    #[error("function {function}, stage {stage}: deadline of {timeout_ms} ms exceeded")]
    DeadlineExceeded {
        /// Function name.
        function: String,
        /// Stage label.
        stage: String,
        /// The function's timeout.
        timeout_ms: u64,
    },
    /// A stage failed or trapped (500).
    #[error("function {function}, stage {stage}: {message}")]
    Internal {
        /// Function name.
        function: String,
        /// Stage label.
        stage: String,
        /// What went wrong, without host internals.
        message: String,
    },
}

impl InvokeError {
    /// HTTP status (also the NATS micro `Nats-Service-Error-Code`).
    pub fn status(&self) -> u16 {
        match self {
            InvokeError::InvalidInput { .. } => 400,
            InvokeError::NotFound(_) | InvokeError::UnknownTag { .. } => 404,
            InvokeError::TooLarge { .. } => 413,
            InvokeError::Internal { .. } => 500,
            InvokeError::Overloaded(_)
            | InvokeError::NoCapacity { .. }
            | InvokeError::Unservable { .. } => 503,
            InvokeError::DeadlineExceeded { .. } => 504,
        }
    }

    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            InvokeError::InvalidInput { .. } => "invalid_input",
            InvokeError::NotFound(_) | InvokeError::UnknownTag { .. } => "not_found",
            InvokeError::TooLarge { .. } => "too_large",
            InvokeError::Internal { .. } => "internal",
            InvokeError::Overloaded(_) => "overloaded",
            InvokeError::NoCapacity { .. } => "capacity",
            InvokeError::Unservable { .. } => "unservable",
            InvokeError::DeadlineExceeded { .. } => "deadline_exceeded",
        }
    }
}
