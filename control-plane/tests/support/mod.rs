pub mod api_server;
pub mod rbac;
