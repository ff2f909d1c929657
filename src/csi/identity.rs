//! The CSI identity service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::common::{RpcResult, Stores};
use super::pb;
use crate::location::Location;
use crate::store::ListRequest;

#[derive(Debug)]
pub struct IdentityService {
    pub driver_name: String,
    pub controller: bool,
    /// Probe checks that this store answers.
    pub probe_store: Option<Location>,
    pub stores: Arc<Stores>,
}

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn get_plugin_info(&self, _r: Request<pb::GetPluginInfoRequest>) -> RpcResult<pb::GetPluginInfoResponse> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _r: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> RpcResult<pb::GetPluginCapabilitiesResponse> {
        use pb::plugin_capability::{Service, Type, VolumeExpansion, service, volume_expansion};
        let mut caps = vec![pb::PluginCapability {
            r#type: Some(Type::VolumeExpansion(VolumeExpansion { r#type: volume_expansion::Type::Online as i32 })),
        }];
        if self.controller {
            caps.push(pb::PluginCapability {
                r#type: Some(Type::Service(Service { r#type: service::Type::ControllerService as i32 })),
            });
        }
        Ok(Response::new(pb::GetPluginCapabilitiesResponse { capabilities: caps }))
    }

    async fn probe(&self, _r: Request<pb::ProbeRequest>) -> RpcResult<pb::ProbeResponse> {
        if let Some(loc) = &self.probe_store {
            let store = self.stores.get(loc, &Default::default()).await?;
            store
                .list(ListRequest { prefix: &loc.prefix, start_after: None, delimiter: true, max_keys: 1 })
                .await
                .map_err(|e| Status::failed_precondition(format!("the store does not answer: {e}")))?;
        }
        Ok(Response::new(pb::ProbeResponse { ready: Some(true) }))
    }
}
