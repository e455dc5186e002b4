//! NATS JetStream: connection, the events stream and its subjects.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::settings::NatsSettings;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("JetStream stream {name}: {message}")]
    Stream { name: String, message: String },
}

/// A JetStream context with its events stream ensured.
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub stream: stream::Stream,
    pub settings: NatsSettings,
}

impl Bus {
    /// Connects and creates the events stream when missing: file storage, subjects
    /// `<prefix>.>`, and a duplicate window so a re-published event is dropped.
    pub async fn connect(settings: &NatsSettings) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name("crm")
            .connect(settings.url.as_str())
            .await
            .map_err(|source| BusError::Connect {
                url: settings.url.clone(),
                source,
            })?;
        let jetstream = jetstream::new(client.clone());
        let stream = jetstream
            .get_or_create_stream(stream::Config {
                name: settings.stream.clone(),
                subjects: vec![settings.all_subjects()],
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(600),
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::Stream {
                name: settings.stream.clone(),
                message: e.to_string(),
            })?;
        Ok(Self {
            client,
            jetstream,
            stream,
            settings: settings.clone(),
        })
    }

    /// Whether the server answers.
    pub async fn ping(&self) -> bool {
        tokio::time::timeout(Duration::from_secs(2), self.client.flush())
            .await
            .is_ok_and(|r| r.is_ok())
            && self.client.connection_state() == async_nats::connection::State::Connected
    }
}
