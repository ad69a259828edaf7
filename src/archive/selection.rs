//! The archive's reading of a [`Filter`]: which objects may hold its events, which lines of
//! them match, and how many.

use std::sync::Arc;

use serde_json::Value as Json;

use super::{
    Archive, ArchiveError, Matcher,
    catalog::{ArchivedObject, Selection},
    format::{ArchivedEvent, json_contains},
};
use crate::filter::Filter;

impl Filter {
    /// The archived objects that may hold matching events.
    pub fn archive_selection(&self) -> Selection {
        Selection {
            services: self.services.clone(),
            patterns: self.allowed_services.clone(),
            start: self.start,
            end: self.end,
            user_id: self.user_id.clone(),
            trace_id: self.trace_id.clone(),
        }
    }

    /// Which lines of a selected object match: everything `push_where` checks in SQL (the
    /// object's service already passed `allowed_services`).
    pub fn archived_matcher(&self) -> Matcher {
        let filter = self.clone();
        let contained = self.metadata_contains.clone().map(Json::Object);
        Arc::new(move |event: &ArchivedEvent| {
            (filter.services.is_empty() || filter.services.contains(&event.service))
                && filter.start.is_none_or(|start| event.timestamp >= start)
                && filter.end.is_none_or(|end| event.timestamp < end)
                && filter
                    .user_id
                    .as_ref()
                    .is_none_or(|user_id| event.user_id.as_ref() == Some(user_id))
                && filter
                    .message_contains
                    .as_ref()
                    .is_none_or(|text| event.message.contains(text.as_str()))
                && contained
                    .as_ref()
                    .is_none_or(|contained| json_contains(&event.metadata, contained))
                && filter
                    .trace_id
                    .as_ref()
                    .is_none_or(|trace_id| event.trace_id.as_ref() == Some(trace_id))
        })
    }

    /// Texts that every matching line holds as it is written (JSON-escaped): a line without
    /// one of them is skipped unparsed. Only texts that JSON writes unescaped are listed.
    pub fn archived_needles(&self) -> Vec<String> {
        let plain = |text: &str| !text.chars().any(|c| c == '"' || c == '\\' || c < ' ');
        [
            self.message_contains.as_deref(),
            self.user_id.as_deref(),
            self.trace_id.as_deref(),
        ]
        .into_iter()
        .flatten()
        .filter(|text| !text.is_empty() && plain(text))
        .map(str::to_owned)
        .collect()
    }

    /// How many events of `object` match, when the catalog alone tells (no content filter,
    /// and the whole object inside the time bounds); None when the object must be read.
    pub fn archived_matches_known(&self, object: &ArchivedObject) -> Option<u64> {
        let whole = self.start.is_none_or(|start| object.min_ts >= start)
            && self.end.is_none_or(|end| object.max_ts < end);
        let by_content = self.metadata_contains.is_some()
            || self.message_contains.is_some()
            || self.trace_id.is_some();
        (whole && !by_content).then(|| object.user_events.unwrap_or(object.rows).max(0) as u64)
    }

    /// How many events of each archived object match: from the catalog when it tells, else by
    /// reading the object.
    pub async fn count_archived(
        &self,
        archive: &Archive,
        objects: &[ArchivedObject],
    ) -> Result<Vec<u64>, ArchiveError> {
        let matcher = self.archived_matcher();
        let mut counts = Vec::with_capacity(objects.len());
        for object in objects {
            let count = match self.archived_matches_known(object) {
                Some(count) => count,
                None => archive.matching_lines(object, matcher.clone()).await?.len() as u64,
            };
            counts.push(count);
        }
        Ok(counts)
    }
}
