//! PostgreSQL wire protocol v3: startup packets, message framing, message
//! builders and the few backend messages the pooler parses during login.
//!
//! Submodules hold one concern each; everything is re-exported here so
//! callers can write `proto::parse_startup` or `proto::startup::parse_startup`.

pub mod backend;
pub mod build;
pub mod error;
pub mod frame;
pub mod startup;

pub use backend::{
    parse_auth_request, backend_key_data_pid, parse_backend_key_data, parse_negotiate_protocol_version,
    parse_parameter_status, parse_ready_for_query, parse_sasl_initial_response, AuthRequest,
};
pub use build::*;
pub use error::{parse_error_fields, ErrorFields, ProtoError};
pub use frame::{parse_message, read_cstr, Message};
pub use startup::{
    clean_ascii, format_options, parse_bool, parse_options, parse_replication, parse_startup, parse_startup_for, startup_names_read,
    unsupported_protocol,
    Replication, ReplicationFlags, ServerProtocol, StartupRequest,
    CANCEL_KEY_3_0, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_PACKET, PROTOCOL_3_0,
    SSL_REQUEST_CODE,
};
