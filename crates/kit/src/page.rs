//! Cursor pagination for every list route: `?limit=&cursor=` in, the page's items as the JSON
//! array the seed's clients expect, and the next page's address in a `Link: <…>; rel="next"`
//! header (RFC 8288) carrying an opaque cursor.
//!
//! A cursor names where the last page stopped, in whatever terms the store sorts by (for the
//! SQL stores the last row's `(created_at, id)`; for DynamoDB its `LastEvaluatedKey`), so a
//! page costs an index range read however deep the client has gone. Clients must treat it as
//! opaque: it is URL-safe base64 of the store's text, and one that does not decode is a 400.
//! `skip` stays for the seed's clients but is bounded ([`MAX_SKIP`]): an offset costs a read
//! of every row it skips.

use axum::http::{HeaderMap, HeaderValue, Uri, header};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use uuid::Uuid;

use crate::Problem;

/// The most rows one page may ask for.
pub const MAX_LIMIT: u32 = 1000;
/// The largest offset `skip` may name; deeper pages are reached with the cursor.
pub const MAX_SKIP: u32 = 10_000;
/// The longest cursor accepted (a cursor this service gives out is far shorter).
const MAX_CURSOR_CHARS: usize = 512;

/// Where a page starts: the store's own description of the last row the previous page held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(String);

impl Cursor {
    /// After the row sorted by `(created_at_ms, id)`: the SQL stores' order.
    pub fn after_row(created_at_ms: i64, id: Uuid) -> Cursor {
        Cursor(format!("{created_at_ms}|{id}"))
    }

    /// The `(created_at_ms, id)` a [`Cursor::after_row`] cursor holds; `None` for any other.
    pub fn row(&self) -> Option<(i64, Uuid)> {
        let (at, id) = self.0.split_once('|')?;
        Some((at.parse().ok()?, id.parse().ok()?))
    }

    /// A store-specific cursor (e.g. DynamoDB's last evaluated key, as text).
    pub fn from_text(text: impl Into<String>) -> Cursor {
        Cursor(text.into())
    }

    pub fn text(&self) -> &str {
        &self.0
    }

    /// The form clients see.
    pub fn token(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0.as_bytes())
    }

    /// Reads a client's cursor back; a 400 for anything this service could not have given out.
    pub fn from_token(token: &str) -> Result<Cursor, Problem> {
        let bad = || {
            Problem::bad_request(
                "cursor is not one this service gave out: follow the Link header's rel=\"next\"",
            )
        };
        if token.is_empty() || token.len() > MAX_CURSOR_CHARS {
            return Err(bad());
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
        String::from_utf8(bytes).map(Cursor).map_err(|_| bad())
    }
}

/// One page of a list and where the next one starts (`None`: this was the last).
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Cursor>,
}

impl<T> Page<T> {
    /// From `limit + 1` rows read in order: the extra row, when present, says a next page
    /// exists, and the page's last row is where it starts.
    pub fn from_rows(mut rows: Vec<T>, limit: u32, key: impl Fn(&T) -> Cursor) -> Page<T> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        if rows.len() > limit {
            rows.truncate(limit);
            let next = rows.last().map(key);
            Page { items: rows, next }
        } else {
            Page {
                items: rows,
                next: None,
            }
        }
    }

    pub fn last(items: Vec<T>) -> Page<T> {
        Page { items, next: None }
    }
}

/// Where a list request asks to start, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct PageRequest {
    pub limit: u32,
    pub start: Start,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// An offset from the first row (the seed's `skip`, 0 by default).
    Skip(u32),
    /// After the row a cursor names.
    After(Cursor),
}

impl PageRequest {
    pub fn first(limit: u32) -> PageRequest {
        PageRequest {
            limit,
            start: Start::Skip(0),
        }
    }

    /// Checks `limit` (1..=[`MAX_LIMIT`]), `skip` (at most [`MAX_SKIP`]) and the cursor; `skip`
    /// and `cursor` together are refused (which should win is anyone's guess).
    pub fn parse(
        limit: u32,
        skip: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<PageRequest, Problem> {
        if limit == 0 || limit > MAX_LIMIT {
            return Err(Problem::bad_request(format!(
                "limit must be between 1 and {MAX_LIMIT}"
            )));
        }
        let start = match (skip, cursor) {
            (Some(_), Some(_)) => {
                return Err(Problem::bad_request("give either skip or cursor, not both"));
            }
            (_, Some(token)) => Start::After(Cursor::from_token(token)?),
            (Some(skip), None) if skip > MAX_SKIP => {
                return Err(Problem::bad_request(format!(
                    "skip must be at most {MAX_SKIP}: follow the Link header's rel=\"next\" \
                     cursor to read further"
                )));
            }
            (skip, None) => Start::Skip(skip.unwrap_or(0)),
        };
        Ok(PageRequest { limit, start })
    }

    /// The SQL stores' keyset start: rows sorting after `(created_at_ms, id)`, then the offset
    /// to skip (0 with a cursor; without one, the start is before every row). A cursor that is
    /// not a row cursor is a [`BadCursor`].
    pub fn row_start(&self) -> Result<((i64, Uuid), u32), BadCursor> {
        match &self.start {
            Start::Skip(skip) => Ok(((i64::MIN, Uuid::nil()), *skip)),
            Start::After(cursor) => cursor.row().map(|row| (row, 0)).ok_or(BadCursor),
        }
    }
}

/// A cursor a store cannot read (given out by another store or list): the client's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the cursor is not one this list gave out")]
pub struct BadCursor;

impl From<BadCursor> for Problem {
    fn from(_: BadCursor) -> Problem {
        Problem::bad_request("cursor is not one this list gave out")
    }
}

/// `?limit=&skip=&cursor=` for lists with no filter of their own. (A list with filters repeats
/// these three fields rather than `#[serde(flatten)]`, which makes serde_urlencoded hand
/// numbers over as strings.)
#[derive(Debug, Clone, Deserialize)]
pub struct PageParams {
    #[serde(default = "default_limit")]
    pub limit: u32,
    pub skip: Option<u32>,
    pub cursor: Option<String>,
}

pub fn default_limit() -> u32 {
    100
}

impl PageParams {
    pub fn checked(&self) -> Result<PageRequest, Problem> {
        PageRequest::parse(self.limit, self.skip, self.cursor.as_deref())
    }
}

/// The response headers for a page: `Link: <this URI with cursor=NEXT>; rel="next"` when a
/// next page exists (the other query parameters kept, `skip` dropped).
pub fn link_headers<T>(uri: &Uri, page: &Page<T>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let Some(next) = &page.next else {
        return headers;
    };
    let mut query: Vec<String> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            !pair.is_empty() && name != "skip" && name != "cursor"
        })
        .map(str::to_owned)
        .collect();
    query.push(format!("cursor={}", next.token()));
    let link = format!("<{}?{}>; rel=\"next\"", uri.path(), query.join("&"));
    if let Ok(value) = HeaderValue::from_str(&link) {
        headers.insert(header::LINK, value);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_cursor_round_trips_through_its_token() {
        let id = Uuid::from_u128(7);
        let cursor = Cursor::after_row(1_700_000_000_123, id);
        let back = Cursor::from_token(&cursor.token()).unwrap();
        assert_eq!(back.row(), Some((1_700_000_000_123, id)));
    }

    #[test]
    fn tokens_that_were_never_given_out_are_refused() {
        for token in ["", "!!!", "%00", &"A".repeat(600)] {
            assert!(Cursor::from_token(token).is_err(), "{token:?}");
        }
        // Valid base64 of something that is not a row cursor: decodes, but no row in it.
        let other = Cursor::from_token(&URL_SAFE_NO_PAD.encode("hello")).unwrap();
        assert_eq!(other.row(), None);
        let request = PageRequest {
            limit: 10,
            start: Start::After(other),
        };
        assert_eq!(request.row_start(), Err(BadCursor));
    }

    #[test]
    fn limits_skip_and_cursor_are_checked() {
        assert!(PageRequest::parse(0, None, None).is_err());
        assert!(PageRequest::parse(MAX_LIMIT + 1, None, None).is_err());
        assert!(PageRequest::parse(10, Some(MAX_SKIP + 1), None).is_err());
        let token = Cursor::after_row(1, Uuid::nil()).token();
        assert!(PageRequest::parse(10, Some(0), Some(&token)).is_err());
        assert_eq!(
            PageRequest::parse(10, Some(MAX_SKIP), None).unwrap().start,
            Start::Skip(MAX_SKIP)
        );
    }

    #[test]
    fn a_full_page_points_at_the_next_and_a_short_one_does_not() {
        let key = |n: &i64| Cursor::after_row(*n, Uuid::nil());
        let page = Page::from_rows(vec![1, 2, 3], 2, key);
        assert_eq!(page.items, vec![1, 2]);
        assert_eq!(page.next, Some(key(&2)));
        let page = Page::from_rows(vec![1, 2], 2, key);
        assert_eq!(page.next, None);
    }

    #[test]
    fn the_link_keeps_filters_and_drops_skip() {
        let uri: Uri = "/api/v1/products?category=books&skip=5&limit=2"
            .parse()
            .unwrap();
        let page = Page {
            items: vec![1],
            next: Some(Cursor::after_row(9, Uuid::nil())),
        };
        let headers = link_headers(&uri, &page);
        let link = headers[header::LINK].to_str().unwrap();
        let token = Cursor::after_row(9, Uuid::nil()).token();
        assert_eq!(
            link,
            format!("</api/v1/products?category=books&limit=2&cursor={token}>; rel=\"next\"")
        );
        assert!(link_headers(&uri, &Page::last(vec![1])).is_empty());
    }
}
