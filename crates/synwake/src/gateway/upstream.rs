//! Connections to instances: one pooled client per (protocol, connect timeout), since the
//! connect timeout and HTTP/2 are properties of the client's connector and pool.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::ForwardBody;
use crate::spec::Protocol;

pub type UpstreamClient = Client<HttpConnector, ForwardBody>;

type Key = (Protocol, Duration);

/// The pooled clients, made on first use of each key (a handful at most).
pub struct Upstream {
    idle_timeout: Duration,
    clients: RwLock<Vec<(Key, Arc<UpstreamClient>)>>,
}

impl Upstream {
    pub fn new(idle_timeout: Duration) -> Self {
        Upstream {
            idle_timeout,
            clients: RwLock::new(Vec::new()),
        }
    }

    pub fn client(&self, protocol: Protocol, connect_timeout: Duration) -> Arc<UpstreamClient> {
        let key = (protocol, connect_timeout);
        if let Some((_, c)) = self.clients.read().unwrap().iter().find(|(k, _)| *k == key) {
            return c.clone();
        }
        let mut clients = self.clients.write().unwrap();
        if let Some((_, c)) = clients.iter().find(|(k, _)| *k == key) {
            return c.clone();
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let mut b = Client::builder(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(self.idle_timeout)
            .pool_max_idle_per_host(256);
        if protocol == Protocol::H2c {
            b.http2_only(true);
        }
        let c = Arc::new(b.build(connector));
        clients.push((key, c.clone()));
        c
    }
}
