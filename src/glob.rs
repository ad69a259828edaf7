//! Service globs (`*` and `?` only), matched in memory and translated exactly to SQL `LIKE`
//! patterns for the database. Used by authorization and by retention rules.

use globset::{Glob, GlobSet, GlobSetBuilder};

/// A glob that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid service glob {glob:?}: {reason}")]
pub struct GlobError {
    pub glob: String,
    pub reason: String,
}

/// A set of service globs.
#[derive(Debug, Clone)]
pub struct ServiceGlobs {
    all: bool,
    globs: GlobSet,
    patterns: Vec<String>,
}

impl ServiceGlobs {
    /// Every service.
    pub fn all() -> Self {
        Self {
            all: true,
            globs: GlobSet::empty(),
            patterns: vec!["*".to_owned()],
        }
    }

    pub fn new(patterns: &[String]) -> Result<Self, GlobError> {
        if patterns.iter().any(|pattern| pattern == "*") {
            return Ok(Self::all());
        }
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            // Only `*` and `?`: they translate exactly to SQL LIKE.
            if pattern.is_empty() || pattern.contains(['[', ']', '{', '}', '\\']) {
                return Err(GlobError {
                    glob: pattern.clone(),
                    reason: "only * and ? are supported in service globs".to_owned(),
                });
            }
            let glob = Glob::new(pattern).map_err(|error| GlobError {
                glob: pattern.clone(),
                reason: error.to_string(),
            })?;
            builder.add(glob);
        }
        let globs = builder.build().map_err(|error| GlobError {
            glob: patterns.join(","),
            reason: error.to_string(),
        })?;
        Ok(Self {
            all: false,
            globs,
            patterns: patterns.to_vec(),
        })
    }

    /// The globs as configured; None when every service matches.
    pub fn globs(&self) -> Option<&[String]> {
        (!self.all).then_some(self.patterns.as_slice())
    }

    pub fn allows(&self, service: &str) -> bool {
        self.all || self.globs.is_match(service)
    }

    /// The globs as SQL `LIKE` patterns (`*` → `%`, `?` → `_`, and `_`, `%`, `\` escaped);
    /// None when every service matches.
    pub fn like_patterns(&self) -> Option<Vec<String>> {
        if self.all {
            return None;
        }
        Some(
            self.patterns
                .iter()
                .map(|pattern| to_like(pattern))
                .collect(),
        )
    }
}

/// A `LIKE` pattern matching `text` anywhere (`%text%`), with its `%`, `_` and `\` escaped.
pub fn like_containing(text: &str) -> String {
    let mut like = String::with_capacity(text.len() + 2);
    like.push('%');
    for character in text.chars() {
        if matches!(character, '%' | '_' | '\\') {
            like.push('\\');
        }
        like.push(character);
    }
    like.push('%');
    like
}

fn to_like(glob: &str) -> String {
    let mut like = String::with_capacity(glob.len());
    for character in glob.chars() {
        match character {
            '*' => like.push('%'),
            '?' => like.push('_'),
            '%' | '_' | '\\' => {
                like.push('\\');
                like.push(character);
            }
            other => like.push(other),
        }
    }
    like
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_and_become_like_patterns() {
        let services =
            ServiceGlobs::new(&["billing".to_owned(), "billing-*".to_owned()]).expect("globs");
        assert!(services.allows("billing"));
        assert!(services.allows("billing-eu"));
        assert!(!services.allows("payments"));
        assert!(!services.allows("billingx"));
        assert_eq!(
            services.like_patterns(),
            Some(vec!["billing".to_owned(), "billing-%".to_owned()])
        );
        let underscore = ServiceGlobs::new(&["a_b*".to_owned()]).expect("glob");
        assert_eq!(underscore.like_patterns(), Some(vec!["a\\_b%".to_owned()]));
        assert!(ServiceGlobs::new(&["[ab]".to_owned()]).is_err());
        assert_eq!(ServiceGlobs::all().like_patterns(), None);
    }
}
