//! The MCP endpoint (docs/ai.md, "MCP endpoint"): AI agents connect over the Model
//! Context Protocol's Streamable HTTP transport at `/mcp`, on the API's own listener
//! (`edge::server` routes the path here), served by the official Rust SDK (`rmcp`).
//!
//! Invariants:
//! - Every HTTP request to `/mcp` is authenticated on its own, before the SDK sees it
//!   ([`http`]): the same bearer check as the API (401 with the API's JSON error), and
//!   only an agent's key (principal `ai_agent`) is let through (403 otherwise). Its
//!   rights are those of that moment (capped by its registering user's). The server
//!   keeps no session: nothing outlives a request or carries a credential from one
//!   request to the next, and any API process can answer any request.
//! - A tool only calls an operation of the route table as the agent
//!   ([`tools`]): reads are redacted by the agent's field policy, and every change is
//!   proposed as an AI action, through the risk policy and the approval queue.

pub mod http;
mod tools;

use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, Implementation, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};

use crate::routes::Authed;
use crate::state::AppState;

pub use http::Endpoint;

/// What an agent is told when it connects.
const INSTRUCTIONS: &str = "The CRM's contacts and consent, for an AI agent. Read with \
    search_contacts, get_contact and get_consent: you see only the fields your role may read. \
    Every change is a proposal (update_contact, send_message, …): the organisation's risk \
    policy runs it at once or queues it for a person's approval; the answer says which \
    (status executed, or pending_approval with the action's id). A refused call answers \
    isError with the API's error ({code, message, fields?}).";

/// The MCP server: one per request (the SDK's service factory), sharing the catalog.
#[derive(Clone)]
pub(crate) struct Server {
    state: AppState,
    catalog: Arc<tools::Catalog>,
}

impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("crm", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.catalog.tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if !self.catalog.has(&request.name) {
            return Err(ErrorData::invalid_params(
                format!("no tool named `{}`", request.name),
                None,
            ));
        }
        // The HTTP gate put the agent into the request's extensions; the SDK hands the
        // request's parts to the handler.
        let Some(caller) = context
            .extensions
            .get::<warp::http::request::Parts>()
            .and_then(|p| p.extensions.get::<Authed>())
            .cloned()
        else {
            return Err(ErrorData::internal_error(
                "the request reached the MCP server unauthenticated",
                None,
            ));
        };
        let result = self
            .catalog
            .call(
                &self.state,
                caller,
                &request.name,
                request.arguments.unwrap_or_default(),
            )
            .await;
        Ok(result.into())
    }
}
