//! The route table: every HTTP route the host serves, with what it needs of
//! the caller declared beside it. A route's permission comes from this
//! table alone, never from the shape of its path.

use crate::access::{Need, Scope};
use hyper::Method;

/// Every route the host serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /healthz`
    Healthz,
    /// `GET /readyz`
    Readyz,
    /// `GET /metrics`
    Metrics,
    /// `GET /ui`: the dashboard's page (it holds no data)
    Ui,
    /// `GET /ui/data`: what the dashboard shows
    UiData,
    /// `POST /v1/functions/{name}/invoke`
    Invoke,
    /// `GET /v1/functions/{name}/status`
    Status,
    /// `POST /v1/functions/{name}/feedback`: the truth about an answer
    Feedback,
    /// `PUT /v1/functions/{name}/drift/reference`: example inputs as the
    /// drift reference
    DriftReference,
    /// `GET /v1/components`
    ListComponents,
    /// `GET /v1/components/{name}`
    ComponentVersions,
    /// `GET /v1/components/{name}/{version}`
    Component,
    /// `GET /v1/components/{name}/{version}/content`
    ComponentContent,
    /// `PUT /v1/components/{name}/{version}`
    PublishComponent,
    /// `DELETE /v1/components/{name}/{version}`
    DeleteComponent,
    /// `GET /v1/models`
    ListModels,
    /// `GET /v1/models/{name}`
    ModelVersions,
    /// `GET /v1/models/{name}/{version}`
    Model,
    /// `GET /v1/models/{name}/{version}/content`
    ModelContent,
    /// `GET /v1/models/{name}/{version}/files/{file}`
    ModelFile,
    /// `PUT /v1/models/{name}/{version}`
    PublishModel,
    /// `DELETE /v1/models/{name}/{version}`
    DeleteModel,
    /// `GET /v1/functions`
    ListFunctions,
    /// `GET /v1/functions/{name}`
    Function,
    /// `GET /v1/functions/{name}/revisions`
    FunctionRevisions,
    /// `GET /v1/functions/{name}/{revision}`
    FunctionRevision,
    /// `GET /v1/functions/{name}/{revision}/content`
    FunctionManifest,
    /// `PUT /v1/functions/{name}`
    PublishFunction,
    /// `DELETE /v1/functions/{name}`
    DeleteFunction,
    /// `POST /v1/functions/{name}/rollback`
    Rollback,
    /// `GET /v1/functions/{name}/traffic`
    Traffic,
    /// `PUT /v1/functions/{name}/traffic`
    SetTraffic,
    /// `GET /v2`: OIP server metadata
    OipServer,
    /// `GET /v2/health/live`
    OipLive,
    /// `GET /v2/health/ready`
    OipReady,
    /// `GET /v2/models/{name}`: OIP model metadata
    OipModel,
    /// `GET /v2/models/{name}/versions/{version}`
    OipModelVersion,
    /// `GET /v2/models/{name}/ready`
    OipModelReady,
    /// `GET /v2/models/{name}/versions/{version}/ready`
    OipModelVersionReady,
    /// `POST /v2/models/{name}/infer`
    OipInfer,
    /// `POST /v2/models/{name}/versions/{version}/infer`
    OipInferVersion,
}

impl Route {
    /// Whether the route is one of the Open Inference Protocol's (errors
    /// are then `{"error": "..."}`).
    pub fn is_oip(self) -> bool {
        matches!(
            self,
            Route::OipServer
                | Route::OipLive
                | Route::OipReady
                | Route::OipModel
                | Route::OipModelVersion
                | Route::OipModelReady
                | Route::OipModelVersionReady
                | Route::OipInfer
                | Route::OipInferVersion
        )
    }
}

const PUBLISH: Need = Need::Scope(Scope::Publish);
const READ: Need = Need::Scope(Scope::Read);

/// Method, path pattern (`{}` is a parameter), route, what it needs. The
/// first match wins, so literal segments come before parameters.
const TABLE: &[(Method, &str, Route, Need)] = &[
    (Method::GET, "/healthz", Route::Healthz, Need::Nothing),
    (Method::GET, "/readyz", Route::Readyz, Need::Nothing),
    (Method::GET, "/ui", Route::Ui, Need::Nothing),
    (Method::GET, "/ui/data", Route::UiData, READ),
    (
        Method::GET,
        "/metrics",
        Route::Metrics,
        Need::Scope(Scope::Metrics),
    ),
    (
        Method::POST,
        "/v1/functions/{}/invoke",
        Route::Invoke,
        Need::InvokeFunction,
    ),
    (Method::GET, "/v1/functions/{}/status", Route::Status, READ),
    (
        Method::POST,
        "/v1/functions/{}/feedback",
        Route::Feedback,
        Need::InvokeFunction,
    ),
    (
        Method::PUT,
        "/v1/functions/{}/drift/reference",
        Route::DriftReference,
        PUBLISH,
    ),
    (Method::GET, "/v1/components", Route::ListComponents, READ),
    (
        Method::GET,
        "/v1/components/{}",
        Route::ComponentVersions,
        READ,
    ),
    (Method::GET, "/v1/components/{}/{}", Route::Component, READ),
    (
        Method::GET,
        "/v1/components/{}/{}/content",
        Route::ComponentContent,
        READ,
    ),
    (
        Method::PUT,
        "/v1/components/{}/{}",
        Route::PublishComponent,
        PUBLISH,
    ),
    (
        Method::DELETE,
        "/v1/components/{}/{}",
        Route::DeleteComponent,
        PUBLISH,
    ),
    (Method::GET, "/v1/models", Route::ListModels, READ),
    (Method::GET, "/v1/models/{}", Route::ModelVersions, READ),
    (Method::GET, "/v1/models/{}/{}", Route::Model, READ),
    (
        Method::GET,
        "/v1/models/{}/{}/content",
        Route::ModelContent,
        READ,
    ),
    (
        Method::GET,
        "/v1/models/{}/{}/files/{}",
        Route::ModelFile,
        READ,
    ),
    (
        Method::PUT,
        "/v1/models/{}/{}",
        Route::PublishModel,
        PUBLISH,
    ),
    (
        Method::DELETE,
        "/v1/models/{}/{}",
        Route::DeleteModel,
        PUBLISH,
    ),
    (Method::GET, "/v1/functions", Route::ListFunctions, READ),
    (Method::GET, "/v1/functions/{}", Route::Function, READ),
    (
        Method::GET,
        "/v1/functions/{}/revisions",
        Route::FunctionRevisions,
        READ,
    ),
    (
        Method::GET,
        "/v1/functions/{}/traffic",
        Route::Traffic,
        READ,
    ),
    (
        Method::PUT,
        "/v1/functions/{}/traffic",
        Route::SetTraffic,
        PUBLISH,
    ),
    (
        Method::GET,
        "/v1/functions/{}/{}",
        Route::FunctionRevision,
        READ,
    ),
    (
        Method::GET,
        "/v1/functions/{}/{}/content",
        Route::FunctionManifest,
        READ,
    ),
    (
        Method::PUT,
        "/v1/functions/{}",
        Route::PublishFunction,
        PUBLISH,
    ),
    (
        Method::DELETE,
        "/v1/functions/{}",
        Route::DeleteFunction,
        PUBLISH,
    ),
    (
        Method::POST,
        "/v1/functions/{}/rollback",
        Route::Rollback,
        PUBLISH,
    ),
    (Method::GET, "/v2", Route::OipServer, Need::Nothing),
    (
        Method::GET,
        "/v2/health/live",
        Route::OipLive,
        Need::Nothing,
    ),
    (
        Method::GET,
        "/v2/health/ready",
        Route::OipReady,
        Need::Nothing,
    ),
    (Method::GET, "/v2/models/{}", Route::OipModel, READ),
    (
        Method::GET,
        "/v2/models/{}/versions/{}",
        Route::OipModelVersion,
        READ,
    ),
    (
        Method::GET,
        "/v2/models/{}/ready",
        Route::OipModelReady,
        READ,
    ),
    (
        Method::GET,
        "/v2/models/{}/versions/{}/ready",
        Route::OipModelVersionReady,
        READ,
    ),
    (
        Method::POST,
        "/v2/models/{}/infer",
        Route::OipInfer,
        Need::InvokeFunction,
    ),
    (
        Method::POST,
        "/v2/models/{}/versions/{}/infer",
        Route::OipInferVersion,
        Need::InvokeFunction,
    ),
];

/// A request matched to its route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched<'a> {
    /// Which route.
    pub route: Route,
    /// What the caller needs.
    pub need: Need,
    /// The path's parameters, in order.
    pub params: Vec<&'a str>,
}

impl Matched<'_> {
    /// The parameter at `index` (the table guarantees how many there are).
    pub fn param(&self, index: usize) -> &str {
        self.params.get(index).copied().unwrap_or_default()
    }

    /// Whether the route changes the registry (refused on a mirror).
    pub fn writes_registry(&self) -> bool {
        // A drift reference is the host's own, in memory: mirrors take it.
        self.need == PUBLISH && self.route != Route::DriftReference
    }
}

/// The route for `method` and `path`, if any.
pub fn resolve<'a>(method: &Method, path: &'a str) -> Option<Matched<'a>> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    TABLE
        .iter()
        .filter(|(m, ..)| m == method)
        .find_map(|(_, pattern, route, need)| {
            let params = matches(pattern, &segments)?;
            Some(Matched {
                route: *route,
                need: *need,
                params,
            })
        })
}

/// The parameters of `segments` if they fit `pattern`.
fn matches<'a>(pattern: &str, segments: &[&'a str]) -> Option<Vec<&'a str>> {
    let parts: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    if parts.len() != segments.len() {
        return None;
    }
    let mut params = Vec::new();
    for (part, segment) in parts.iter().zip(segments) {
        match *part {
            "{}" => params.push(*segment),
            literal if literal == *segment => {}
            _ => return None,
        }
    }
    Some(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_named_invoke_is_still_a_registry_write() {
        for method in [Method::PUT, Method::DELETE] {
            let matched = resolve(&method, "/v1/functions/invoke").expect("a route");
            assert_eq!(matched.need, PUBLISH, "{method}");
            assert!(matched.writes_registry());
        }
        let invoke = resolve(&Method::POST, "/v1/functions/invoke/invoke").expect("a route");
        assert_eq!(invoke.route, Route::Invoke);
        assert_eq!(invoke.params, ["invoke"]);
        assert_eq!(invoke.need, Need::InvokeFunction);
        assert_eq!(resolve(&Method::PUT, "/v1/functions/x/invoke"), None);
    }

    #[test]
    fn literal_segments_win_over_parameters() {
        let status = resolve(&Method::GET, "/v1/functions/embed/status").expect("a route");
        assert_eq!(status.route, Route::Status);
        let revisions = resolve(&Method::GET, "/v1/functions/embed/revisions").expect("a route");
        assert_eq!(revisions.route, Route::FunctionRevisions);
        let revision = resolve(&Method::GET, "/v1/functions/embed/3").expect("a route");
        assert_eq!(
            (revision.route, revision.param(1)),
            (Route::FunctionRevision, "3")
        );
    }

    #[test]
    fn every_registry_change_needs_publish() {
        for (method, pattern, route, need) in TABLE {
            let changes =
                matches!(*method, Method::PUT | Method::DELETE) || *route == Route::Rollback;
            assert_eq!(changes, *need == PUBLISH, "{method} {pattern}");
            assert!(pattern.starts_with('/'));
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn method() -> impl Strategy<Value = Method> {
            prop_oneof![
                Just(Method::GET),
                Just(Method::PUT),
                Just(Method::POST),
                Just(Method::DELETE),
                Just(Method::HEAD),
                Just(Method::PATCH),
            ]
        }

        fn segment() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("v1".to_string()),
                Just("functions".to_string()),
                Just("components".to_string()),
                Just("models".to_string()),
                Just("invoke".to_string()),
                Just("status".to_string()),
                Just("content".to_string()),
                Just("rollback".to_string()),
                ".{0,12}",
            ]
        }

        proptest! {
            #[test]
            fn any_path_resolves_to_a_declared_route_or_none(
                method in method(),
                segments in proptest::collection::vec(segment(), 0..7),
                trailing in any::<bool>(),
            ) {
                let mut path = format!("/{}", segments.join("/"));
                if trailing {
                    path.push('/');
                }
                if let Some(matched) = resolve(&method, &path) {
                    let declared = TABLE
                        .iter()
                        .find(|(m, _, route, _)| *m == method && *route == matched.route);
                    prop_assert!(declared.is_some());
                    let (_, pattern, _, need) = declared.expect("declared");
                    prop_assert_eq!(*need, matched.need);
                    prop_assert_eq!(pattern.matches("{}").count(), matched.params.len());
                    let changes = matches!(method, Method::PUT | Method::DELETE)
                        || matched.route == Route::Rollback;
                    prop_assert_eq!(changes, matched.writes_registry());
                }
            }
        }
    }
}
