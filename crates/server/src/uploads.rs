//! Uploaded audio waiting to be referenced by `AudioPart.upload_id`: content-addressed, bounded in total
//! bytes (oldest dropped first), expiring after a time-to-live. The clock is an argument, for tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tonic::{Response, Status, Streaming};

use crate::config::ServerConfig;
use crate::convert;
use crate::pb;
use crate::status::ApiError;

/// The `UploadAudio` RPC over `store` (shared by the embedded server and the router).
pub async fn receive(
    mut stream: Streaming<pb::UploadAudioRequest>,
    store: &Mutex<UploadStore>,
    cfg: &ServerConfig,
) -> Result<Response<pb::UploadAudioResponse>, Status> {
    let mut data = Vec::new();
    let mut hint = None;
    let mut first = true;
    while let Some(msg) = stream.next().await {
        let msg = msg?;
        if first {
            hint = convert::format_hint(msg.format);
            first = false;
        }
        if data.len() + msg.chunk.len() > cfg.max_upload_bytes {
            return Err(ApiError::TooLarge {
                what: "the upload",
                got: data.len() + msg.chunk.len(),
                limit: cfg.max_upload_bytes,
            }
            .into());
        }
        data.extend_from_slice(&msg.chunk);
    }
    if data.is_empty() {
        return Err(ApiError::BadRequest {
            location: "upload".into(),
            problem: "no bytes were sent".into(),
        }
        .into());
    }
    let size = data.len() as u64;
    let id = store
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .put(data, hint, Instant::now())
        .ok_or(ApiError::UploadStoreFull {
            limit: cfg.upload_store_bytes,
        })?;
    Ok(Response::new(pb::UploadAudioResponse {
        upload_id: id,
        size_bytes: size,
    }))
}

#[derive(Debug, Clone)]
pub struct Upload {
    pub data: Arc<Vec<u8>>,
    pub format_hint: Option<String>,
    stored: Instant,
}

#[derive(Debug)]
pub struct UploadStore {
    capacity: usize,
    ttl: Duration,
    bytes: usize,
    map: HashMap<String, Upload>,
}

impl UploadStore {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        UploadStore {
            capacity,
            ttl,
            bytes: 0,
            map: HashMap::new(),
        }
    }

    /// The id of `data` (blake3, hex).
    pub fn id_of(data: &[u8]) -> String {
        blake3::hash(data).to_hex().to_string()
    }

    /// Stores an upload; false if it cannot fit even after dropping expired and older uploads.
    pub fn put(
        &mut self,
        data: Vec<u8>,
        format_hint: Option<String>,
        now: Instant,
    ) -> Option<String> {
        self.expire(now);
        let id = Self::id_of(&data);
        if let Some(u) = self.map.get_mut(&id) {
            u.stored = now;
            return Some(id);
        }
        if data.len() > self.capacity {
            return None;
        }
        while self.bytes + data.len() > self.capacity {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, u)| u.stored)
                .map(|(k, _)| k.clone())?;
            if let Some(u) = self.map.remove(&oldest) {
                self.bytes -= u.data.len();
            }
        }
        self.bytes += data.len();
        self.map.insert(
            id.clone(),
            Upload {
                data: Arc::new(data),
                format_hint,
                stored: now,
            },
        );
        Some(id)
    }

    pub fn get(&mut self, id: &str, now: Instant) -> Option<Upload> {
        self.expire(now);
        self.map.get(id).cloned()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn expire(&mut self, now: Instant) {
        let ttl = self.ttl;
        let mut freed = 0;
        self.map.retain(|_, u| {
            let keep = now.saturating_duration_since(u.stored) < ttl;
            if !keep {
                freed += u.data.len();
            }
            keep
        });
        self.bytes -= freed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_content_addressed_and_expiring() {
        let t0 = Instant::now();
        let mut s = UploadStore::new(10, Duration::from_secs(5));
        let a = s.put(vec![1; 4], None, t0).unwrap();
        assert_eq!(
            s.put(vec![1; 4], None, t0).unwrap(),
            a,
            "same content, same id"
        );
        let b = s
            .put(vec![2; 4], None, t0 + Duration::from_secs(1))
            .unwrap();
        let c = s
            .put(vec![3; 4], None, t0 + Duration::from_secs(2))
            .unwrap();
        assert!(
            s.get(&a, t0 + Duration::from_secs(2)).is_none(),
            "oldest dropped for room"
        );
        assert!(s.get(&b, t0 + Duration::from_secs(2)).is_some());
        assert!(s.bytes() <= 10);
        assert!(s.get(&c, t0 + Duration::from_secs(8)).is_none(), "expired");
        assert_eq!(s.bytes(), 0);
        assert!(s.put(vec![0; 11], None, t0).is_none());
    }
}
