//! The route table: Synapse's endpoint families as data (`routes/*.yaml`),
//! compiled once against a topology into a `matchit` router whose entries
//! already name the pool that serves them.

mod key;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use http::Method;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

pub use key::{KeyKind, KeySource, StickyKey, query_param};

use crate::config::{ConfigError, ConfigErrors, Problems};
use crate::topology::{PoolId, Topology, WorkerId};

/// The built-in route table, tracking Synapse's docs/workers.md.
pub const BUILTIN_ROUTES: &str = include_str!("../../routes/synapse.yaml");
const BUILTIN_NAME: &str = "routes/synapse.yaml (built in)";

/// A route table file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// The Synapse release whose worker documentation the table follows.
    pub synapse_version: String,
    pub routes: Vec<RouteSpec>,
}

/// One route as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub name: String,
    #[serde(default)]
    pub doc: Option<String>,
    pub pool: PoolChain,
    pub key: KeyKind,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub query_any: Vec<String>,
    #[serde(default)]
    pub long_poll: bool,
    pub paths: Vec<String>,
}

/// A pool, or pools tried in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PoolChain {
    One(String),
    Many(Vec<String>),
}

impl PoolChain {
    fn names(&self) -> &[String] {
        match self {
            PoolChain::One(n) => std::slice::from_ref(n),
            PoolChain::Many(v) => v,
        }
    }
}

impl RouteFile {
    pub fn builtin() -> Result<RouteFile, ConfigErrors> {
        Self::parse(BUILTIN_ROUTES, Path::new(BUILTIN_NAME))
    }

    pub fn load(path: &Path) -> Result<RouteFile, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                path,
                "",
                format!("cannot read route table: {e}"),
                "check the routes path",
            )
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, origin: &Path) -> Result<RouteFile, ConfigErrors> {
        serde_yaml_ng::from_str(text).map_err(|e| {
            ConfigError::new(
                origin,
                "",
                format!("invalid route table: {e}"),
                "see the format described at the top of routes/synapse.yaml",
            )
            .into()
        })
    }
}

/// A query condition of a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryCondition {
    /// The parameter is absent or empty.
    Absent(String),
    /// The parameter has this exact value.
    Equals(String, String),
}

impl QueryCondition {
    fn holds(&self, query: Option<&str>) -> bool {
        match self {
            QueryCondition::Absent(p) => query_param(query, p).is_none_or(str::is_empty),
            QueryCondition::Equals(p, v) => query_param(query, p) == Some(v.as_str()),
        }
    }
}

/// A compiled route: where its requests go and what they stick by.
#[derive(Debug, Clone, Serialize)]
pub struct Route {
    pub name: String,
    /// The pool that serves it under this topology (fallbacks resolved).
    pub pool: PoolId,
    /// The pools as written, for explanations.
    pub pool_chain: Vec<String>,
    pub key: KeyKind,
    /// `None`: any method.
    #[serde(serialize_with = "ser_methods")]
    pub methods: Option<Vec<Method>>,
    /// Any one must hold; empty: always.
    pub query_any: Vec<QueryCondition>,
    pub long_poll: bool,
    /// Whether main may serve the route when its pool has no live worker:
    /// not for stream-writer endpoints (only the writer may serve them) nor
    /// for media when main does not run the media repository.
    pub fallback_to_main: bool,
    /// The concrete matchit patterns (alternatives expanded).
    pub paths: Vec<String>,
}

fn ser_methods<S: serde::Serializer>(m: &Option<Vec<Method>>, s: S) -> Result<S::Ok, S::Error> {
    let names: Option<Vec<&str>> = m.as_ref().map(|v| v.iter().map(Method::as_str).collect());
    names.serialize(s)
}

impl Route {
    fn accepts(&self, method: &Method, query: Option<&str>) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method))
            && (self.query_any.is_empty() || self.query_any.iter().any(|c| c.holds(query)))
    }
}

type RouteIds = SmallVec<[u16; 2]>;

/// The compiled table. Index 0 is the fallback route to main.
#[derive(Debug, Clone)]
pub struct RouteTable {
    pub synapse_version: String,
    pub source: PathBuf,
    routes: Vec<Route>,
    router: matchit::Router<RouteIds>,
}

/// What the table says about one request.
#[derive(Debug, Clone, Copy)]
pub struct Matched<'r, 'q> {
    pub route: &'r Route,
    pub key: StickyKey<'q>,
}

/// The route taken by any path no route matches.
pub const FALLBACK_ROUTE: &str = "main_fallback";

impl RouteTable {
    /// Compiles a route file against a topology. Every problem is reported.
    pub fn compile(
        file: &RouteFile,
        source: &Path,
        topology: &Topology,
    ) -> Result<RouteTable, ConfigErrors> {
        let mut problems = Problems::default();
        let mut routes = vec![Route {
            name: FALLBACK_ROUTE.to_string(),
            pool: topology.main_pool(),
            pool_chain: vec!["main".to_string()],
            key: KeyKind::None,
            methods: None,
            query_any: Vec::new(),
            long_poll: false,
            fallback_to_main: true,
            paths: Vec::new(),
        }];
        let main_has_media = topology.worker(WorkerId::MAIN).media_enabled;
        let mut by_path: Vec<(String, RouteIds)> = Vec::new();
        let mut path_index: HashMap<String, usize> = HashMap::new();
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, spec) in file.routes.iter().enumerate() {
            let at = format!("routes[{i}] ({})", spec.name);
            if names.insert(&spec.name, i).is_some() {
                problems.push(ConfigError::new(
                    source,
                    &at,
                    format!("route name `{}` is used twice", spec.name),
                    "give every route a unique name",
                ));
            }
            if spec.name == FALLBACK_ROUTE {
                problems.push(ConfigError::new(
                    source,
                    &at,
                    "this route name is reserved",
                    "rename it",
                ));
            }
            // Resolve the pool chain: the first pool with workers, else main.
            let mut pool = None;
            for name in spec.pool.names() {
                match topology.pool_id(name) {
                    Some(id) if pool.is_none() && !topology.pool(id).is_empty() => pool = Some(id),
                    Some(_) => {}
                    None => problems.push(ConfigError::new(
                        source,
                        format!("{at}.pool"),
                        format!("unknown pool `{name}`"),
                        format!(
                            "use one of: {} (or define it under `pools:` in edge.yaml)",
                            topology
                                .pools
                                .iter()
                                .map(|p| p.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )),
                }
            }
            let methods = if spec.methods.is_empty() {
                None
            } else {
                let mut ms = Vec::new();
                for m in &spec.methods {
                    match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                        Ok(m) => ms.push(m),
                        Err(_) => problems.push(ConfigError::new(
                            source,
                            format!("{at}.methods"),
                            format!("`{m}` is not an HTTP method"),
                            "write methods like GET, PUT, POST",
                        )),
                    }
                }
                Some(ms)
            };
            let mut query_any = Vec::new();
            for q in &spec.query_any {
                if let Some(p) = q.strip_prefix('!') {
                    query_any.push(QueryCondition::Absent(p.to_string()));
                } else if let Some((p, v)) = q.split_once('=') {
                    query_any.push(QueryCondition::Equals(p.to_string(), v.to_string()));
                } else {
                    problems.push(ConfigError::new(
                        source,
                        format!("{at}.query_any"),
                        format!("cannot read condition `{q}`"),
                        "write `!param` (absent or empty) or `param=value`",
                    ));
                }
            }
            let id = routes.len() as u16;
            routes.push(Route {
                name: spec.name.clone(),
                pool: pool.unwrap_or(topology.main_pool()),
                pool_chain: spec.pool.names().to_vec(),
                key: spec.key,
                methods,
                query_any,
                long_poll: spec.long_poll,
                fallback_to_main: spec
                    .pool
                    .names()
                    .iter()
                    .all(|p| !p.starts_with("stream:") && (p != "media" || main_has_media)),
                paths: Vec::new(),
            });
            if spec.paths.is_empty() {
                problems.push(ConfigError::new(
                    source,
                    &at,
                    "the route has no paths",
                    "list its paths",
                ));
            }
            for pattern in &spec.paths {
                let expanded = match expand_alternatives(pattern) {
                    Ok(e) => e,
                    Err(why) => {
                        problems.push(ConfigError::new(
                            source,
                            format!("{at}.paths"),
                            format!("`{pattern}`: {why}"),
                            "write alternatives as `(a|b)`, not nested",
                        ));
                        continue;
                    }
                };
                if spec.key == KeyKind::Room && !pattern.contains("{room}") {
                    problems.push(ConfigError::new(
                        source,
                        format!("{at}.paths"),
                        format!("`{pattern}` has no {{room}} segment but the route sticks by room"),
                        "name the room segment {room}, or use another key",
                    ));
                }
                for path in expanded {
                    routes[id as usize].paths.push(path.clone());
                    match path_index.get(&path) {
                        Some(&j) => by_path[j].1.push(id),
                        None => {
                            path_index.insert(path.clone(), by_path.len());
                            by_path.push((path, SmallVec::from_slice(&[id])));
                        }
                    }
                }
            }
        }
        let mut router = matchit::Router::new();
        for (path, ids) in by_path {
            if let Err(e) = router.insert(path.clone(), ids) {
                problems.push(ConfigError::new(
                    source,
                    "paths",
                    format!("`{path}` cannot be added to the router: {e}"),
                    "make the patterns unambiguous (a segment is either one {param} or a {*rest} at the end)",
                ));
            }
        }
        problems.into_result(RouteTable {
            synapse_version: file.synapse_version.clone(),
            source: source.to_path_buf(),
            routes,
            router,
        })
    }

    /// The built-in table, or the one an edge config names, compiled.
    pub fn load(routes: Option<&Path>, topology: &Topology) -> Result<RouteTable, ConfigErrors> {
        match routes {
            Some(p) => Self::compile(&RouteFile::load(p)?, p, topology),
            None => Self::compile(&RouteFile::builtin()?, Path::new(BUILTIN_NAME), topology),
        }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Finds the route for a request and extracts its sticky key.
    /// `path` is the raw path as sent (no query), matched as Synapse matches.
    pub fn lookup<'r, 'q>(
        &'r self,
        method: &Method,
        path: &'q str,
        keys: &KeySource<'q>,
    ) -> Matched<'r, 'q> {
        if let Ok(m) = self.router.at(path) {
            for &id in m.value {
                let route = &self.routes[id as usize];
                if route.accepts(method, keys.query) {
                    let key = match route.key {
                        KeyKind::Room => match m.params.get("room") {
                            Some(raw) => StickyKey::Room(raw),
                            None => StickyKey::Spread,
                        },
                        KeyKind::User => key::user_key(keys),
                        KeyKind::Origin => key::origin_key(keys),
                        KeyKind::None => StickyKey::Spread,
                    };
                    return Matched { route, key };
                }
            }
        }
        Matched {
            route: &self.routes[0],
            key: StickyKey::Spread,
        }
    }
}

/// Expands `(a|b)` groups into every combination.
fn expand_alternatives(pattern: &str) -> Result<Vec<String>, &'static str> {
    let Some(open) = pattern.find('(') else {
        if pattern.contains([')', '|']) {
            return Err("unbalanced `)` or `|` outside a group");
        }
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..].find(')').ok_or("unclosed `(`")? + open;
    let inner = &pattern[open + 1..close];
    if inner.contains('(') {
        return Err("nested groups");
    }
    let rest = expand_alternatives(&pattern[close + 1..])?;
    let mut out = Vec::new();
    for alt in inner.split('|') {
        for tail in &rest {
            out.push(format!("{}{alt}{tail}", &pattern[..open]));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternatives_expand_to_each_version() {
        assert_eq!(
            expand_alternatives("/_matrix/client/(r0|v3)/rooms/{room}/(join|leave)").unwrap(),
            vec![
                "/_matrix/client/r0/rooms/{room}/join",
                "/_matrix/client/r0/rooms/{room}/leave",
                "/_matrix/client/v3/rooms/{room}/join",
                "/_matrix/client/v3/rooms/{room}/leave",
            ]
        );
        assert!(expand_alternatives("/a/(b/c").is_err());
        assert!(expand_alternatives("/a/((b)|c)").is_err());
    }

    #[test]
    fn query_conditions() {
        let absent = QueryCondition::Absent("since".into());
        assert!(absent.holds(None));
        assert!(absent.holds(Some("timeout=0")));
        assert!(absent.holds(Some("since=")));
        assert!(!absent.holds(Some("since=s72594_4483_1934")));
        let eq = QueryCondition::Equals("full_state".into(), "true".into());
        assert!(eq.holds(Some("since=x&full_state=true")));
        assert!(!eq.holds(Some("full_state=false")));
    }
}
