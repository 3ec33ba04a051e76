//! Management API in the OpenFaaS gateway's shape, plus /healthz, /metrics and the same
//! /function/<name>/ proxy as the shared port (OpenFaaS clients use one gateway URL).

pub mod async_call;
mod async_store;
pub mod auth;
pub mod callback;
pub mod deploy;
mod logs;
mod progress;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

use crate::gateway::path::quote;
use crate::gateway::{full, text_response, Proxy, ProxyBody, Route};
use crate::lifecycle::{Lifecycle, ScaleError};
use crate::metrics::Snapshot;
use crate::spec::{self, FunctionSpec, Policy, Source};
use crate::state::StateDir;
use deploy::{FunctionDeployment, FunctionStatusJson, NAMESPACE};

/// Request bodies larger than this are refused (413).
const MAX_BODY: usize = 1 << 20;

/// The management API.
pub struct Api {
    proxy: Arc<Proxy>,
    /// Which lifecycle version the port listeners match (deploys wait for their port).
    ports_synced: tokio::sync::watch::Receiver<u64>,
    state: StateDir,
    defaults: Policy,
    /// Ports no function may take (the gateway's own).
    reserved_ports: Vec<u16>,
    credential: auth::Credential,
    orchestration: &'static str,
    /// Serialises deploys/removals so persisted state matches the lifecycle.
    write_lock: tokio::sync::Mutex<()>,
    noted_fields: Mutex<HashSet<String>>,
    /// One lock per function being deployed: its deploys run one at a time in arrival
    /// order (the last one wins) while its pull runs outside `write_lock`.
    deploying: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The durable queue of `POST /async-function/` calls.
    async_queue: async_call::AsyncQueue,
}

impl Api {
    #[allow(clippy::too_many_arguments)] // the daemon's parts, each passed once at start
    pub fn new(
        proxy: Arc<Proxy>,
        ports_synced: tokio::sync::watch::Receiver<u64>,
        state: StateDir,
        defaults: Policy,
        reserved_ports: Vec<u16>,
        credential: auth::Credential,
        orchestration: &'static str,
        async_queue: async_call::AsyncQueue,
    ) -> Arc<Self> {
        Arc::new(Api {
            proxy,
            ports_synced,
            state,
            defaults,
            reserved_ports,
            credential,
            orchestration,
            write_lock: tokio::sync::Mutex::new(()),
            noted_fields: Mutex::new(HashSet::new()),
            deploying: Mutex::new(HashMap::new()),
            async_queue,
        })
    }

    fn lc(&self) -> &Lifecycle {
        self.proxy.lifecycle()
    }

    /// Routes one API request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        // Routed on the resolved path, so `/function/x/../../system/...` is a system call
        // with its checks, never a function's.
        let path = match crate::gateway::path::resolve_dot_segments(req.uri().path()) {
            Some(p) => p.into_owned(),
            None => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "request path {} does not start with /",
                        quote(req.uri().path())
                    ),
                )
            }
        };
        if path.starts_with("/function/") {
            let conn = crate::gateway::ConnInfo::plain(peer);
            return self
                .proxy
                .clone()
                .handle(
                    req.map(crate::gateway::ForwardBody::Client),
                    &Route::Shared,
                    &conn,
                )
                .await;
        }
        if let Some(rest) = path.strip_prefix("/async-function/") {
            if req.method() != Method::POST {
                return text_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "async calls are POST /async-function/<name>",
                );
            }
            let rest = rest.to_string();
            let conn = crate::gateway::ConnInfo::plain(peer);
            return self.async_queue.accept(req, &rest, &conn).await;
        }
        match (req.method(), path.as_str()) {
            (&Method::GET, "/healthz") => return text_response(StatusCode::OK, "OK"),
            (&Method::GET, "/metrics") => {
                let accept = req
                    .headers()
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let (content_type, text) = self
                    .lc()
                    .metrics()
                    .render_for(accept, &[self.async_queue.metrics(), self.image_metrics()]);
                return Response::builder()
                    .header(http::header::CONTENT_TYPE, content_type)
                    .body(full(text))
                    .unwrap();
            }
            _ => {}
        }
        if path.starts_with("/system/") {
            if let Some(resp) = self.check_auth(&req) {
                return resp;
            }
            if let Some(r) = other_namespace(query_param(req.uri().query(), "namespace")) {
                return r;
            }
        }
        let method = req.method().clone();
        match (method, path.as_str()) {
            (Method::GET, "/system/functions") => {
                let list: Vec<FunctionStatusJson> =
                    self.lc().statuses().iter().map(Into::into).collect();
                json(StatusCode::OK, &list)
            }
            (Method::POST, "/system/functions") => self.deploy(req, false).await,
            (Method::PUT, "/system/functions") => self.deploy(req, true).await,
            (Method::DELETE, "/system/functions") => self.remove(req).await,
            (Method::GET, "/system/info") => json(StatusCode::OK, &self.info()),
            (Method::GET, "/system/namespaces") => json(StatusCode::OK, &[NAMESPACE]),
            (Method::GET, "/system/images") => self.images_list(),
            (Method::POST, "/system/images/prune") => self.images_prune().await,
            (Method::GET, "/system/logs") => logs::serve(self.lc(), req.uri().query()),
            (Method::GET, "/system/secrets") => match self.state.secrets().list() {
                Ok(names) => {
                    let list: Vec<serde_json::Value> = names
                        .iter()
                        .map(|n| serde_json::json!({ "name": n, "namespace": NAMESPACE }))
                        .collect();
                    json(StatusCode::OK, &list)
                }
                Err(e) => text_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            },
            (Method::POST | Method::PUT | Method::DELETE, "/system/secrets") => {
                self.secret(req).await
            }
            (Method::GET, p) if p.starts_with("/system/function/") => {
                let name = &p["/system/function/".len()..];
                match self.lc().status(name) {
                    Some(s) => json(StatusCode::OK, &FunctionStatusJson::from(&s)),
                    None => text_response(
                        StatusCode::NOT_FOUND,
                        format!("function {} not found", quote(name)),
                    ),
                }
            }
            (Method::POST, p) if p.starts_with("/system/scale-function/") => {
                let name = p["/system/scale-function/".len()..].to_string();
                self.scale(req, &name).await
            }
            (_, p) if p.starts_with("/system/") => text_response(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "{} {} is not part of the management API",
                    req.method(),
                    quote(p)
                ),
            ),
            (_, p) => text_response(StatusCode::NOT_FOUND, format!("no route for {}", quote(p))),
        }
    }

    /// POST (create), PUT (update), DELETE a secret; body `{"name": ..., "value": ...}`.
    async fn secret(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        #[derive(serde::Deserialize)]
        struct SecretBody {
            name: String,
            #[serde(default)]
            value: Option<String>,
            #[serde(default, rename = "rawValue")]
            raw_value: Option<Vec<u8>>,
            #[serde(default)]
            namespace: Option<String>,
        }
        let method = req.method().clone();
        let body = match read_body(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        // serde's message names the position, never the value.
        let b: SecretBody = match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    format!("invalid secret JSON (want {{\"name\", \"value\"}}): {e}"),
                )
            }
        };
        if let Some(r) = other_namespace(b.namespace.clone()) {
            return r;
        }
        let store = self.state.secrets();
        let value = b
            .raw_value
            .clone()
            .or_else(|| b.value.clone().map(String::into_bytes));
        let result = match (&method, value) {
            (&Method::DELETE, _) => store.delete(&b.name).map(|()| StatusCode::OK),
            (_, None) => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    "secret: field \"value\" is required",
                )
            }
            (m, Some(v)) => {
                let create = m == Method::POST;
                store.put(&b.name, &v, create).map(|()| {
                    if create {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    }
                })
            }
        };
        use crate::secrets::SecretError;
        match result {
            Ok(status) => {
                tracing::info!(
                    "secret {:?} {}",
                    b.name,
                    match method {
                        Method::POST => "created",
                        Method::PUT => "updated",
                        _ => "deleted",
                    }
                );
                text_response(
                    status,
                    format!(
                        "secret {} {}",
                        b.name,
                        status.canonical_reason().unwrap_or("")
                    ),
                )
            }
            Err(e @ SecretError::Missing(_)) => text_response(StatusCode::NOT_FOUND, e.to_string()),
            Err(e @ SecretError::Exists(_)) => text_response(StatusCode::CONFLICT, e.to_string()),
            Err(e @ (SecretError::BadName(_) | SecretError::TooLarge { .. })) => {
                text_response(StatusCode::BAD_REQUEST, e.to_string())
            }
            Err(e) => {
                tracing::error!("{e}");
                text_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }

    fn check_auth(&self, req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
        let ok = self
            .credential
            .accepts(req.headers().get(http::header::AUTHORIZATION));
        if ok {
            return None;
        }
        let mut r = text_response(
            StatusCode::UNAUTHORIZED,
            "authentication required: basic auth as user admin",
        );
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"synwake\""),
        );
        Some(r)
    }

    fn info(&self) -> serde_json::Value {
        let version = serde_json::json!({
            "release": env!("CARGO_PKG_VERSION"),
            "sha": option_env!("SYNWAKE_GIT_SHA").unwrap_or("unknown"),
        });
        let mut info = serde_json::json!({
            "provider": {"provider": "synwake", "orchestration": self.orchestration, "version": version},
            "version": version,
            "arch": std::env::consts::ARCH,
        });
        if let Some(rt) = self.lc().runtime(crate::spec::RuntimeKind::Oci) {
            if let Some(store) = rt.images() {
                info["imageStore"] = serde_json::json!(store.usage());
            }
        }
        info
    }

    /// `GET /system/images`: the oci image store's images, who uses them, and disk use.
    fn images_list(&self) -> Response<ProxyBody> {
        let Some(rt) = self.lc().runtime(crate::spec::RuntimeKind::Oci) else {
            return no_image_store();
        };
        let Some(store) = rt.images() else {
            return no_image_store();
        };
        let images: Vec<serde_json::Value> = store
            .list()
            .into_iter()
            .map(|(img, functions)| {
                serde_json::json!({
                    "digest": img.digest,
                    "layers": img.layers.len(),
                    "functions": functions,
                })
            })
            .collect();
        json(
            StatusCode::OK,
            &serde_json::json!({ "usage": store.usage(), "images": images }),
        )
    }

    /// `POST /system/images/prune`: removes what no function and no container uses.
    async fn images_prune(&self) -> Response<ProxyBody> {
        let Some(rt) = self.lc().runtime(crate::spec::RuntimeKind::Oci) else {
            return no_image_store();
        };
        let Some(store) = rt.images() else {
            return no_image_store();
        };
        match store.prune().await {
            Ok(report) => json(
                StatusCode::OK,
                &serde_json::json!({ "removed": report, "usage": store.usage() }),
            ),
            Err(e) => text_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("image prune: {e}"),
            ),
        }
    }

    /// The image store gauges for /metrics (nothing without the oci runtime).
    fn image_metrics(&self) -> Snapshot {
        let mut m = Snapshot::default();
        let Some(rt) = self.lc().runtime(crate::spec::RuntimeKind::Oci) else {
            return m;
        };
        let Some(store) = rt.images() else {
            return m;
        };
        let u = store.usage();
        m.gauge(
            "synwake_image_store_bytes",
            "Disk bytes used by the oci image store (layers, images, blobs; a hard-linked file once).",
            u.bytes as i64,
        );
        m.gauge(
            "synwake_image_store_images",
            "Images in the oci image store.",
            u.images as i64,
        );
        m.gauge(
            "synwake_image_store_layers",
            "Unpacked layer chains in the oci image store.",
            u.layers as i64,
        );
        m
    }

    async fn deploy(self: &Arc<Self>, req: Request<Incoming>, update: bool) -> Response<ProxyBody> {
        let live_progress = query_param(req.uri().query(), "progress").as_deref() == Some("true");
        let body = match read_body(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let d: FunctionDeployment = match serde_json::from_slice(&body) {
            Ok(d) => d,
            Err(e) => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    format!("invalid FunctionDeployment JSON: {e}"),
                )
            }
        };
        if let Some(r) = other_namespace(d.namespace.clone()) {
            return r;
        }
        let unused = d.unused_fields();
        let spec = match d.into_spec(&self.defaults) {
            Ok(s) => s,
            Err(e) => return text_response(StatusCode::BAD_REQUEST, e.to_string()),
        };
        for f in unused {
            if self.noted_fields.lock().unwrap().insert(f.clone()) {
                tracing::info!(
                    "deploy of {}: field {f:?} is accepted but not used by synwake (noted once)",
                    spec.name
                );
            }
        }
        // A client that hangs up must not cancel a change half-way (saved, not applied).
        let api = self.clone();
        if live_progress {
            // Subscribed before the deploy starts, so no line of its pull is missed.
            let logs = self.lc().logs().subscribe();
            let name = spec.name.clone();
            let task = tokio::spawn(async move { api.apply_deploy(spec, update, false).await });
            return progress::stream(name, logs, task);
        }
        tokio::spawn(async move { api.apply_deploy(spec, update, true).await })
            .await
            .unwrap_or_else(|e| {
                text_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("deploy failed: {e}"),
                )
            })
    }

    /// Fetches the image (a pull: outside the write lock, so other functions' changes go
    /// on), then saves and applies under the write lock.
    /// `echo_pull`: start the answer with the lines this deploy's pull logged.
    async fn apply_deploy(
        &self,
        spec: FunctionSpec,
        update: bool,
        echo_pull: bool,
    ) -> Response<ProxyBody> {
        let name = spec.name.clone();
        let one = self.function_lock(&name);
        let response = {
            let _one = one.lock().await;
            let deploy_started = std::time::SystemTime::now();
            match self.deploy_target(&spec, update) {
                Err((status, msg)) => text_response(status, msg),
                Ok(_) => match self.lc().fetch(&spec).await {
                    Err(e) => text_response(
                        StatusCode::BAD_REQUEST,
                        format!("cannot deploy {name}: {e}"),
                    ),
                    Ok(()) => {
                        let r = self
                            .apply_fetched(spec.clone(), update, echo_pull, deploy_started)
                            .await;
                        self.lc().unstage(&spec);
                        r
                    }
                },
            }
        };
        self.release_function_lock(&name, one);
        response
    }

    /// The lock a function's deploys and removes take first, in arrival order.
    fn function_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut deploying = self.deploying.lock().unwrap();
        deploying.entry(name.to_string()).or_default().clone()
    }

    fn release_function_lock(&self, name: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut deploying = self.deploying.lock().unwrap();
        // Ours and the map's: nobody else waits for this function.
        if Arc::strong_count(&lock) <= 2 {
            deploying.remove(name);
        }
    }

    /// The function a deploy replaces (`None`: a new one), or the refusal: PUT of an
    /// unknown function, or one defined in the config file.
    fn deploy_target(
        &self,
        spec: &FunctionSpec,
        update: bool,
    ) -> Result<Option<Arc<FunctionSpec>>, (StatusCode, String)> {
        let existing = self.lc().get(&spec.name).map(|f| f.spec().clone());
        match (&existing, update) {
            (None, true) => Err((
                StatusCode::NOT_FOUND,
                format!("function {} not found (deploy it with POST)", spec.name),
            )),
            (Some(e), _) if e.source == Source::Config => Err((
                StatusCode::CONFLICT,
                format!(
                    "function {} is defined in the config file and is read-only through the API",
                    spec.name
                ),
            )),
            _ => Ok(existing),
        }
    }

    /// Saves, then applies; a failed save changes nothing, a failed apply undoes the save.
    async fn apply_fetched(
        &self,
        spec: FunctionSpec,
        update: bool,
        echo_pull: bool,
        deploy_started: std::time::SystemTime,
    ) -> Response<ProxyBody> {
        let _w = self.write_lock.lock().await;
        let existing = match self.deploy_target(&spec, update) {
            Ok(e) => e,
            Err((status, msg)) => return text_response(status, msg),
        };
        if let Err(msg) = self.check_conflicts(&spec) {
            return text_response(StatusCode::BAD_REQUEST, msg);
        }
        if let Some(missing) = self.state.secrets().first_missing(&spec.secrets) {
            return text_response(
                StatusCode::BAD_REQUEST,
                format!(
                    "cannot deploy {}: secrets: secret {missing:?} does not exist (create it with POST /system/secrets)",
                    spec.name
                ),
            );
        }
        // Host claims are unique: a second claim is a conflict with a deployed function.
        if let Some((host, other)) = self
            .lc()
            .specs()
            .iter()
            .filter(|o| o.name != spec.name)
            .find_map(|o| spec::shared_host(&spec, o).map(|h| (h.to_string(), o.name.clone())))
        {
            return text_response(
                StatusCode::CONFLICT,
                format!(
                    "invalid field `annotations.com.synwake.hosts`: host {host:?} of function {} is already claimed by function {other}",
                    spec.name
                ),
            );
        }
        let name = spec.name.clone();
        let mut saved: Vec<FunctionSpec> = self
            .api_specs()
            .into_iter()
            .filter(|s| s.name != name)
            .collect();
        saved.push(spec.clone());
        saved.sort_by(|a, b| a.name.cmp(&b.name));
        let staged = match self.state.stage_functions(&saved) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("function {name} not deployed: {e}");
                return text_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "function {name} not deployed, nothing changed: cannot save the state: {e}"
                    ),
                );
            }
        };
        if let Err(e) = self.lc().deploy(spec).await {
            if let Err(re) = staged.rollback() {
                tracing::error!("function {name}: undoing the saved deploy failed: {re}");
            }
            return text_response(
                StatusCode::BAD_REQUEST,
                format!("cannot deploy {name}: {e}"),
            );
        }
        staged.commit();
        // Return once the function's own port (if any) accepts connections.
        let version = *self.lc().subscribe_changes().borrow();
        let mut synced = self.ports_synced.clone();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            synced.wait_for(|v| *v >= version),
        )
        .await;
        tracing::info!(
            "function {name} {} through the API",
            if existing.is_some() {
                "updated"
            } else {
                "deployed"
            }
        );
        // What this deploy pulled, so `synwake deploy` shows it.
        let mut pulled = String::new();
        for l in self.lc().logs().recent(&name) {
            if echo_pull && l.instance == "pull" && l.time >= deploy_started {
                pulled.push_str(&l.text);
                pulled.push('\n');
            }
        }
        text_response(
            StatusCode::ACCEPTED,
            format!(
                "{pulled}function {name} {}",
                if existing.is_some() {
                    "updated"
                } else {
                    "deployed"
                }
            ),
        )
    }

    fn check_conflicts(&self, spec: &FunctionSpec) -> Result<(), String> {
        for other in self.lc().specs() {
            if other.name == spec.name {
                continue;
            }
            for (p, field) in own_ports(spec) {
                if own_ports(&other).iter().any(|(q, _)| *q == p) {
                    return Err(format!(
                        "invalid field `annotations.com.synwake.{field}`: port {p} is already used by function {}",
                        other.name
                    ));
                }
            }
            if other.id() == spec.id() {
                return Err(format!(
                    "invalid field `service`: function id {:08x} of {} collides with function {}; choose another name",
                    spec.id(),
                    spec.name,
                    other.name
                ));
            }
        }
        if spec.port.is_some() && spec.port == spec.tls_port {
            return Err(format!(
                "invalid field `annotations.com.synwake.tls-port`: port {} is also the function's plain port",
                spec.tls_port.unwrap_or_default()
            ));
        }
        if spec.tls_port.is_some() && !self.proxy.tls_enabled() {
            return Err("invalid field `annotations.com.synwake.tls-port`: the gateway has no [[certificate]] configured".into());
        }
        let current = self.lc().get(&spec.name).map(|f| own_ports(f.spec()));
        for (p, field) in own_ports(spec) {
            if self.reserved_ports.contains(&p) {
                return Err(format!(
                    "invalid field `annotations.com.synwake.{field}`: port {p} is the gateway's own"
                ));
            }
            if !current
                .as_ref()
                .is_some_and(|c| c.iter().any(|(q, _)| *q == p))
            {
                if let Err(e) = std::net::TcpListener::bind(("0.0.0.0", p)) {
                    return Err(format!("invalid field `annotations.com.synwake.{field}`: port {p} cannot be bound: {e}"));
                }
            }
        }
        Ok(())
    }

    /// The functions deployed through the API, as they are in memory.
    fn api_specs(&self) -> Vec<FunctionSpec> {
        self.lc()
            .specs()
            .iter()
            .filter(|s| s.source == Source::Api)
            .map(|s| (**s).clone())
            .collect()
    }

    async fn remove(self: &Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Delete {
            function_name: Option<String>,
            namespace: Option<String>,
        }
        let body = match read_body(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let delete = match serde_json::from_slice::<Delete>(&body) {
            Ok(d) => d,
            Err(e) => return text_response(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
        };
        if let Some(r) = other_namespace(delete.namespace) {
            return r;
        }
        let name = match delete.function_name {
            Some(n) if !n.is_empty() => n,
            _ => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    "invalid field `functionName`: required",
                )
            }
        };
        let api = self.clone();
        tokio::spawn(async move { api.apply_remove(name).await })
            .await
            .unwrap_or_else(|e| {
                text_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("removal failed: {e}"),
                )
            })
    }

    /// After the deploys of the function that came before it (their pulls included).
    async fn apply_remove(&self, name: String) -> Response<ProxyBody> {
        let one = self.function_lock(&name);
        let response = {
            let _one = one.lock().await;
            self.apply_remove_locked(&name).await
        };
        self.release_function_lock(&name, one);
        response
    }

    /// Saves the list without the function, then removes it; a failed save changes nothing.
    async fn apply_remove_locked(&self, name: &str) -> Response<ProxyBody> {
        let _w = self.write_lock.lock().await;
        match self.lc().get(name).map(|f| f.spec().source) {
            None => return text_response(StatusCode::NOT_FOUND, format!("function {} not found", quote(name))),
            Some(Source::Config) => {
                return text_response(
                    StatusCode::CONFLICT,
                    format!("function {name} is defined in the config file and is read-only through the API"),
                )
            }
            Some(Source::Api) => {}
        }
        let saved: Vec<FunctionSpec> = self
            .api_specs()
            .into_iter()
            .filter(|s| s.name != name)
            .collect();
        match self.state.stage_functions(&saved) {
            Ok(staged) => staged.commit(),
            Err(e) => {
                tracing::error!("function {name} not removed: {e}");
                return text_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "function {name} not removed, nothing changed: cannot save the state: {e}"
                    ),
                );
            }
        }
        self.lc().remove(name).await;
        tracing::info!("function {name} removed through the API");
        text_response(StatusCode::OK, format!("function {name} removed"))
    }

    async fn scale(&self, req: Request<Incoming>, name: &str) -> Response<ProxyBody> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Scale {
            service_name: Option<String>,
            replicas: Option<i64>,
            namespace: Option<String>,
        }
        let body = match read_body(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let s: Scale = match serde_json::from_slice(&body) {
            Ok(s) => s,
            Err(e) => return text_response(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
        };
        if let Some(r) = other_namespace(s.namespace) {
            return r;
        }
        if let Some(sn) = &s.service_name {
            if !sn.is_empty() && sn != name {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    format!("invalid field `serviceName`: {sn:?} does not match the path's function {name:?}"),
                );
            }
        }
        let replicas = match s.replicas {
            Some(r) if (0..=u32::MAX as i64).contains(&r) => r as u32,
            Some(r) => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    format!("invalid field `replicas`: {r} is negative or too large"),
                )
            }
            None => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    "invalid field `replicas`: required",
                )
            }
        };
        match self.lc().scale(name, replicas).await {
            Ok(()) => text_response(
                StatusCode::ACCEPTED,
                format!("function {name} scaled to {replicas}"),
            ),
            Err(e @ ScaleError::UnknownFunction { .. }) => {
                text_response(StatusCode::NOT_FOUND, e.to_string())
            }
            Err(e @ ScaleError::ShuttingDown { .. }) => {
                text_response(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            Err(e) => text_response(
                StatusCode::BAD_REQUEST,
                format!("invalid field `replicas`: {e}"),
            ),
        }
    }
}

/// 404 for a namespace other than synwake's one (none or empty means that one).
fn no_image_store() -> Response<ProxyBody> {
    text_response(
        StatusCode::NOT_FOUND,
        "no image store: the oci runtime is not set up on this daemon",
    )
}

fn other_namespace(ns: Option<String>) -> Option<Response<ProxyBody>> {
    let ns = ns.filter(|ns| !ns.is_empty() && ns != NAMESPACE)?;
    Some(text_response(
        StatusCode::NOT_FOUND,
        format!(
            "namespace {} not found; synwake has one namespace, {NAMESPACE:?}",
            quote(&ns)
        ),
    ))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<ProxyBody>> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => Err(text_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body unreadable or over {MAX_BODY} bytes: {e}"),
        )),
    }
}

fn json<T: serde::Serialize + ?Sized>(status: StatusCode, v: &T) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_vec(v).expect("serializable")))
        .unwrap()
}

/// First value of `key` in a query string (percent-decoded).
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A function's own ports with the annotation that sets each.
fn own_ports(spec: &FunctionSpec) -> Vec<(u16, &'static str)> {
    let mut v = Vec::new();
    if let Some(p) = spec.port {
        v.push((p, "port"));
    }
    if let Some(p) = spec.tls_port {
        v.push((p, "tls-port"));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query() {
        assert_eq!(
            query_param(Some("name=a%20b&tail=5"), "name").as_deref(),
            Some("a b")
        );
        assert_eq!(query_param(Some("follow"), "follow").as_deref(), Some(""));
        assert_eq!(query_param(None, "x"), None);
    }
}
