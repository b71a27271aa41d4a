//! Region routing: which region is a recording's home, chosen from its asciicast header.
//!
//! Rules are tried in order; the first whose conditions all hold names the region. A condition
//! is a header field and a list of patterns, any of which may match (`*` matches any run of
//! characters). A rule without conditions matches everything. When no rule matches, the
//! recording belongs to the receiving node's own region.
//!
//! | rule key | header field |
//! | --- | --- |
//! | `src_node_tags` | `srcNodeTags` (any tag) |
//! | `src_node` | `srcNode` |
//! | `src_node_user` | `srcNodeUser` |
//! | `ssh_user` | `sshUser` |
//! | `kubernetes_namespace` | `kubernetes.Namespace` (Kubernetes API-server proxy sessions) |

use serde::Deserialize;

use crate::cast::CastHeader;

/// One routing rule.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The home region of recordings this rule matches.
    pub region: String,
    #[serde(default)]
    pub src_node_tags: Vec<String>,
    #[serde(default)]
    pub src_node: Vec<String>,
    #[serde(default)]
    pub src_node_user: Vec<String>,
    #[serde(default)]
    pub ssh_user: Vec<String>,
    #[serde(default)]
    pub kubernetes_namespace: Vec<String>,
}

impl Rule {
    /// The rule's conditions, in a fixed order, with their names; empty lists are unset.
    fn conditions(&self) -> [(&'static str, &[String]); 5] {
        [
            ("src_node_tags", &self.src_node_tags),
            ("src_node", &self.src_node),
            ("src_node_user", &self.src_node_user),
            ("ssh_user", &self.ssh_user),
            ("kubernetes_namespace", &self.kubernetes_namespace),
        ]
    }

    /// True when every set condition holds for `header`.
    pub fn matches(&self, header: &CastHeader) -> bool {
        let any = |patterns: &[String], value: Option<&str>| {
            patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| glob(p, v)))
        };
        let tags = header.src_node_tags();
        (self.src_node_tags.is_empty()
            || tags
                .iter()
                .any(|t| self.src_node_tags.iter().any(|p| glob(p, t))))
            && any(&self.src_node, header.str_field("srcNode"))
            && any(&self.src_node_user, header.str_field("srcNodeUser"))
            && any(&self.ssh_user, header.str_field("sshUser"))
            && any(&self.kubernetes_namespace, header.kubernetes("Namespace"))
    }

    /// True when every header this rule matches is also matched by `earlier`, so this rule can
    /// never be reached after it. Conservative: it may miss a shadowing, never invent one.
    pub fn shadowed_by(&self, earlier: &Rule) -> bool {
        self.conditions()
            .iter()
            .zip(earlier.conditions())
            .all(|((_, mine), (_, theirs))| {
                theirs.is_empty()
                    || (!mine.is_empty() && mine.iter().all(|m| theirs.iter().any(|t| glob(t, m))))
            })
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob(pattern: &str, value: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return value.is_empty();
    };
    let Some(mut rest) = value.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The first rule matching `header`, if any.
pub fn route<'a>(rules: &'a [Rule], header: &CastHeader) -> Option<&'a Rule> {
    rules.iter().find(|r| r.matches(header))
}

/// Problems with a rule list: rules that an earlier rule makes unreachable.
pub fn unreachable_rules(rules: &[Rule]) -> Vec<String> {
    let mut problems = Vec::new();
    for (j, rule) in rules.iter().enumerate() {
        if let Some(i) = rules[..j].iter().position(|e| rule.shadowed_by(e)) {
            problems.push(format!(
                "routing rule {} (region {:?}) is unreachable: rule {} (region {:?}) matches everything it matches",
                j + 1,
                rule.region,
                i + 1,
                rules[i].region
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(json: &str) -> CastHeader {
        CastHeader::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn globs() {
        assert!(glob("tag:eu", "tag:eu"));
        assert!(!glob("tag:eu", "tag:eu2"));
        assert!(glob("tag:eu*", "tag:eu2"));
        assert!(glob("*", ""));
        assert!(glob("*.eu.ts.net", "db.eu.ts.net"));
        assert!(!glob("*.eu.ts.net", "db.us.ts.net"));
        assert!(glob("a*b*c", "a-b-b-c"));
        assert!(!glob("a*b*c", "a-c"));
        assert!(!glob("ab*ba", "aba"));
    }

    #[test]
    fn first_matching_rule_wins_and_all_conditions_must_hold() {
        let rules = vec![
            Rule {
                region: "eu".into(),
                src_node_tags: vec!["tag:eu".into()],
                ssh_user: vec!["root".into(), "admin*".into()],
                ..Rule::default()
            },
            Rule {
                region: "us".into(),
                src_node: vec!["*.us.example".into()],
                ..Rule::default()
            },
            Rule {
                region: "k8s".into(),
                kubernetes_namespace: vec!["prod".into()],
                ..Rule::default()
            },
        ];
        let h = header(
            r#"{"version":2,"width":80,"height":24,"srcNodeTags":["tag:x","tag:eu"],"sshUser":"admin2","srcNode":"a.us.example"}"#,
        );
        assert_eq!(route(&rules, &h).unwrap().region, "eu");
        let h = header(
            r#"{"version":2,"width":80,"height":24,"srcNodeTags":["tag:eu"],"sshUser":"bob","srcNode":"a.us.example"}"#,
        );
        assert_eq!(route(&rules, &h).unwrap().region, "us");
        let h = header(
            r#"{"version":2,"width":80,"height":24,"kubernetes":{"Namespace":"prod","PodName":"p"}}"#,
        );
        assert_eq!(route(&rules, &h).unwrap().region, "k8s");
        let h = header(r#"{"version":2,"width":80,"height":24}"#);
        assert!(route(&rules, &h).is_none());
    }

    #[test]
    fn shadowed_rules_are_reported() {
        let catch_all = Rule {
            region: "a".into(),
            ..Rule::default()
        };
        let eu = Rule {
            region: "eu".into(),
            src_node_tags: vec!["tag:eu*".into()],
            ..Rule::default()
        };
        let eu_root = Rule {
            region: "b".into(),
            src_node_tags: vec!["tag:eu-west".into()],
            ssh_user: vec!["root".into()],
            ..Rule::default()
        };
        let other = Rule {
            region: "c".into(),
            ssh_user: vec!["root".into()],
            ..Rule::default()
        };
        assert!(unreachable_rules(&[eu.clone(), other.clone()]).is_empty());
        assert_eq!(unreachable_rules(&[eu.clone(), eu_root.clone()]).len(), 1);
        assert!(unreachable_rules(&[eu_root, eu.clone()]).is_empty());
        assert_eq!(unreachable_rules(&[catch_all, eu, other]).len(), 2);
    }
}
