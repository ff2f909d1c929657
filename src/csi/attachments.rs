//! Which volumes Kubernetes still attaches to this node: the node's
//! VolumeAttachments of this driver, read by the node plugin before it
//! serves staged volumes again after a restart (as ceph-csi's node healer
//! does). A volume staged here whose VolumeAttachment went away while the
//! plugin was down was detached or moved to another node: serving it again
//! would open it for writing here and fence the writer that took it over.
//!
//! Owns only the reading; the node service decides what to serve.

use std::collections::HashSet;

use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, ListParams};

#[derive(Debug, thiserror::Error)]
pub enum AttachmentsError {
    #[error("listing VolumeAttachments: {0}")]
    List(#[source] kube::Error),
    #[error("reading PersistentVolume {pv}: {source}")]
    Pv {
        pv: String,
        #[source]
        source: kube::Error,
    },
}

/// The Kubernetes API, seen from a node plugin.
#[derive(Clone)]
pub struct NodeAttachments {
    client: kube::Client,
    driver: String,
}

impl std::fmt::Debug for NodeAttachments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAttachments").field("driver", &self.driver).finish_non_exhaustive()
    }
}

/// Objects per list page.
const PAGE: u32 = 500;

impl NodeAttachments {
    pub fn new(client: kube::Client, driver: impl Into<String>) -> Self {
        Self { client, driver: driver.into() }
    }

    /// The volume ids (CSI volume handles) this driver's VolumeAttachments
    /// attach, or are attaching, to `node`. One being deleted (detaching)
    /// does not count. A PersistentVolume source is read for its handle.
    pub async fn attached_to(&self, node: &str) -> Result<HashSet<String>, AttachmentsError> {
        let attachments: Api<VolumeAttachment> = Api::all(self.client.clone());
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let mut out = HashSet::new();
        let mut params = ListParams::default().limit(PAGE);
        loop {
            let page = attachments.list(&params).await.map_err(AttachmentsError::List)?;
            for va in &page.items {
                let spec = &va.spec;
                if spec.attacher != self.driver || spec.node_name != node || va.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let inline = spec.source.inline_volume_spec.as_ref().and_then(|s| s.csi.as_ref());
                if let Some(csi) = inline {
                    out.insert(csi.volume_handle.clone());
                    continue;
                }
                let Some(name) = &spec.source.persistent_volume_name else { continue };
                let pv = pvs.get_opt(name).await.map_err(|source| AttachmentsError::Pv { pv: name.clone(), source })?;
                if let Some(csi) = pv.and_then(|pv| pv.spec).and_then(|s| s.csi).filter(|c| c.driver == self.driver) {
                    out.insert(csi.volume_handle);
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(out),
            }
        }
    }
}
