//! `dynamodb://TABLE?region=REGION&endpoint=URL`: how a service's database URL names a
//! DynamoDB table. One parser for every DynamoDB-backed store (notifications, payments,
//! orders), so they accept and refuse the same URLs. No AWS dependency here: each store builds
//! its client from the parts (region and endpoint fall back to the standard AWS environment).

/// The parts of a `dynamodb://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamoUrl {
    pub table: String,
    pub region: Option<String>,
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("database url `{url}`: {why}")]
pub struct DynamoUrlError {
    pub url: String,
    pub why: String,
}

/// Whether `url` names a DynamoDB table (then [`parse`] decides whether it is a valid one).
pub fn is_dynamo_url(url: &str) -> bool {
    url.starts_with("dynamodb://")
}

/// Parses `dynamodb://TABLE?region=..&endpoint=..` (both parameters optional, nothing else
/// accepted: a misspelt parameter must fail at start-up, not silently talk to AWS).
pub fn parse(url: &str) -> Result<DynamoUrl, DynamoUrlError> {
    let bad = |why: &str| DynamoUrlError {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let rest = url
        .strip_prefix("dynamodb://")
        .ok_or_else(|| bad("expected dynamodb://TABLE?region=..&endpoint=.."))?;
    let (table, query) = rest.split_once('?').unwrap_or((rest, ""));
    // DynamoDB's own rule for table names.
    if !(3..=255).contains(&table.len())
        || !table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(bad("the table name must be 3 to 255 of A-Z a-z 0-9 _ - ."));
    }
    let mut parsed = DynamoUrl {
        table: table.to_owned(),
        region: None,
        endpoint: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("region", region)) if !region.is_empty() && parsed.region.is_none() => {
                parsed.region = Some(region.to_owned());
            }
            Some(("endpoint", endpoint))
                if (endpoint.starts_with("http://") || endpoint.starts_with("https://"))
                    && parsed.endpoint.is_none() =>
            {
                parsed.endpoint = Some(endpoint.to_owned());
            }
            _ => {
                return Err(bad(&format!(
                    "unknown, empty or repeated parameter `{pair}` (region=NAME, endpoint=http(s)://..)"
                )));
            }
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_table_region_and_endpoint() {
        assert_eq!(
            parse("dynamodb://orders?region=us-east-1&endpoint=http://127.0.0.1:5000"),
            Ok(DynamoUrl {
                table: "orders".into(),
                region: Some("us-east-1".into()),
                endpoint: Some("http://127.0.0.1:5000".into()),
            })
        );
        assert_eq!(
            parse("dynamodb://mercato-prod.payments_v2"),
            Ok(DynamoUrl {
                table: "mercato-prod.payments_v2".into(),
                region: None,
                endpoint: None,
            })
        );
        assert_eq!(
            parse("dynamodb://abc?endpoint=https://dynamodb.eu-west-1.amazonaws.com")
                .map(|u| (u.region, u.endpoint)),
            Ok((
                None,
                Some("https://dynamodb.eu-west-1.amazonaws.com".to_owned())
            ))
        );
        assert!(is_dynamo_url("dynamodb://orders"));
        assert!(!is_dynamo_url("sqlite://orders.db"));
    }

    #[test]
    fn refuses_bad_urls() {
        for url in [
            "sqlite://orders.db",
            "dynamodb://",
            "dynamodb://ab",
            "dynamodb://orders/x",
            "dynamodb://or ders",
            "dynamodb://orders?regoin=us-east-1",
            "dynamodb://orders?region=",
            "dynamodb://orders?region=a&region=b",
            "dynamodb://orders?endpoint=127.0.0.1:5000",
            "dynamodb://orders?region",
        ] {
            let err = parse(url).expect_err(url);
            assert_eq!(err.url, url);
        }
        assert_eq!(
            parse("dynamodb://orders?regoin=x").map_err(|e| e.to_string()),
            Err("database url `dynamodb://orders?regoin=x`: unknown, empty or repeated parameter `regoin=x` (region=NAME, endpoint=http(s)://..)".to_owned())
        );
    }
}
