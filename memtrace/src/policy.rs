//! Which pods the agent traces: namespaces to include and exclude (globs), a pod label
//! selector (Kubernetes syntax), the per-pod annotation `memtrace.io/trace: "true"|"false"`,
//! and a default of tracing every pod or only those that opt in.
use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use globset::{Glob, GlobSet, GlobSetBuilder};

/// The per-pod annotation that opts a pod in (`"true"`) or out (`"false"`).
pub const TRACE_ANNOTATION: &str = "memtrace.io/trace";

/// The per-pod annotation that asks for the allocator probes (`"true"`) without waiting for
/// the always-on tier to see the pod's memory grow (`--probes escalate`). Escalation's
/// windows, back-off and the CPU budget still apply: an annotation left behind costs a
/// window now and then, not probes for ever.
pub const ESCALATE_ANNOTATION: &str = "memtrace.io/escalate";

/// Whether a pod's annotations ask for the allocator probes ([`ESCALATE_ANNOTATION`]).
pub fn asks_for_probes(annotations: &BTreeMap<String, String>) -> bool {
    annotations
        .get(ESCALATE_ANNOTATION)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// What happens to a pod that no flag or annotation decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum TraceDefault {
    /// Trace every selected pod unless it opts out.
    #[default]
    All,
    /// Trace only pods annotated `memtrace.io/trace: "true"`.
    OptIn,
}

/// The decision rules, built once from the flags.
#[derive(Clone, Debug)]
pub struct Policy {
    include: Option<GlobSet>,
    exclude: GlobSet,
    selector: Selector,
    default: TraceDefault,
}

/// What the policy needs to know of a pod.
#[derive(Clone, Copy, Debug)]
pub struct PodFacts<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
}

impl Policy {
    pub fn new(
        namespaces: &[String],
        exclude_namespaces: &[String],
        pod_selector: Option<&str>,
        default: TraceDefault,
    ) -> Result<Self> {
        let include = (!namespaces.is_empty())
            .then(|| globs(namespaces))
            .transpose()?;
        Ok(Self {
            include,
            exclude: globs(exclude_namespaces)?,
            selector: Selector::parse(pod_selector.unwrap_or(""))?,
            default,
        })
    }

    /// Whether to trace a pod. Namespace and selector filters always apply (an annotation
    /// cannot pull a pod out of an excluded namespace); within them the annotation decides,
    /// and the default decides pods without it.
    pub fn traces(&self, pod: PodFacts) -> bool {
        if self.exclude.is_match(pod.namespace)
            || self
                .include
                .as_ref()
                .is_some_and(|set| !set.is_match(pod.namespace))
            || !self.selector.matches(pod.labels)
        {
            return false;
        }
        match pod.annotations.get(TRACE_ANNOTATION).map(|v| v.trim()) {
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            _ => self.default == TraceDefault::All,
        }
    }

    /// Whether a container whose pod is not known (yet) is traced, under its container id:
    /// only when nothing could exclude it (trace-all, no namespace or label filter).
    pub fn traces_unknown(&self) -> bool {
        self.default == TraceDefault::All
            && self.include.is_none()
            && self.exclude.is_empty()
            && self.selector.is_empty()
    }
}

fn globs(patterns: &[String]) -> Result<GlobSet> {
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        builder.add(Glob::new(pattern).with_context(|| format!("bad namespace glob {pattern:?}"))?);
    }
    Ok(builder.build()?)
}

/// A Kubernetes label selector: comma-separated requirements, all of which must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// Parses `app=web,tier!=cache,env in (prod,staging),!canary,release`.
    pub fn parse(text: &str) -> Result<Self> {
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements
                .push(Requirement::parse(part).with_context(|| format!("pod selector {text:?}"))?);
        }
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

/// Splits on commas outside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

impl Requirement {
    fn parse(part: &str) -> Result<Self> {
        if let Some(key) = part.strip_prefix('!') {
            return Ok(Self::DoesNotExist(key_of(key)?));
        }
        if let Some((key, value)) = part.split_once("!=") {
            return Ok(Self::NotEquals(key_of(key)?, value.trim().to_owned()));
        }
        if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
            return Ok(Self::Equals(key_of(key)?, value.trim().to_owned()));
        }
        for (word, set_op) in [(" notin ", false), (" in ", true)] {
            if let Some((key, values)) = part.split_once(word) {
                let values = values
                    .trim()
                    .strip_prefix('(')
                    .and_then(|v| v.strip_suffix(')'))
                    .with_context(|| format!("{part:?}: values go in parentheses"))?;
                let values: Vec<String> = values
                    .split(',')
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
                    .collect();
                let key = key_of(key)?;
                return Ok(if set_op {
                    Self::In(key, values)
                } else {
                    Self::NotIn(key, values)
                });
            }
        }
        Ok(Self::Exists(key_of(part)?))
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Equals(k, v) => labels.get(k) == Some(v),
            Self::NotEquals(k, v) => labels.get(k) != Some(v),
            Self::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Self::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Self::Exists(k) => labels.contains_key(k),
            Self::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

fn key_of(text: &str) -> Result<String> {
    let key = text.trim();
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    {
        bail!("{key:?} is not a label key");
    }
    Ok(key.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn traces(
        policy: &Policy,
        namespace: &str,
        labels: &[(&str, &str)],
        ann: &[(&str, &str)],
    ) -> bool {
        policy.traces(PodFacts {
            namespace,
            labels: &map(labels),
            annotations: &map(ann),
        })
    }

    #[test]
    fn selectors_read_like_kubectls() {
        let s =
            Selector::parse("app=web, tier!=cache,env in (prod, staging),!canary,release").unwrap();
        let good = map(&[("app", "web"), ("env", "prod"), ("release", "1")]);
        assert!(s.matches(&good));
        let mut canary = good.clone();
        canary.insert("canary".into(), "yes".into());
        assert!(!s.matches(&canary));
        let mut dev = good.clone();
        dev.insert("env".into(), "dev".into());
        assert!(!s.matches(&dev));
        let mut cache = good.clone();
        cache.insert("tier".into(), "cache".into());
        assert!(!s.matches(&cache));
        assert!(Selector::parse("a notin (x)").unwrap().matches(&map(&[])));
        assert!(
            Selector::parse("a==b")
                .unwrap()
                .matches(&map(&[("a", "b")]))
        );
        assert!(Selector::parse("").unwrap().is_empty());
        assert!(Selector::parse("a in x").is_err());
        assert!(Selector::parse("=b").is_err());
    }

    #[test]
    fn the_escalate_annotation() {
        assert!(asks_for_probes(&map(&[(ESCALATE_ANNOTATION, "true")])));
        assert!(asks_for_probes(&map(&[(ESCALATE_ANNOTATION, " TRUE ")])));
        assert!(!asks_for_probes(&map(&[(ESCALATE_ANNOTATION, "false")])));
        assert!(!asks_for_probes(&map(&[(ESCALATE_ANNOTATION, "yes")])));
        assert!(!asks_for_probes(&map(&[(TRACE_ANNOTATION, "true")])));
    }

    #[test]
    fn namespaces_annotations_and_default() {
        let all = Policy::new(&[], &["kube-*".into()], None, TraceDefault::All).unwrap();
        assert!(traces(&all, "shop", &[], &[]));
        assert!(!traces(&all, "kube-system", &[], &[]));
        assert!(!traces(
            &all,
            "kube-system",
            &[],
            &[(TRACE_ANNOTATION, "true")]
        ));
        assert!(!traces(&all, "shop", &[], &[(TRACE_ANNOTATION, "false")]));
        assert!(!all.traces_unknown());

        let opt_in = Policy::new(
            &["shop".into(), "team-*".into()],
            &[],
            Some("app=web"),
            TraceDefault::OptIn,
        )
        .unwrap();
        assert!(!traces(&opt_in, "shop", &[("app", "web")], &[]));
        assert!(traces(
            &opt_in,
            "team-a",
            &[("app", "web")],
            &[(TRACE_ANNOTATION, "true")]
        ));
        assert!(!traces(
            &opt_in,
            "other",
            &[("app", "web")],
            &[(TRACE_ANNOTATION, "true")]
        ));
        assert!(!traces(
            &opt_in,
            "shop",
            &[("app", "db")],
            &[(TRACE_ANNOTATION, "true")]
        ));

        let everything = Policy::new(&[], &[], None, TraceDefault::All).unwrap();
        assert!(everything.traces_unknown());
        assert!(Policy::new(&["[".into()], &[], None, TraceDefault::All).is_err());
    }
}
