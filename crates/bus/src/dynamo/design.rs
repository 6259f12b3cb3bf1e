//! A DynamoDB table's design as data: the keys, the typed key attributes, the indexes and the
//! TTL attribute of one store's table. The store creates its table from it on local servers
//! ([`TableDesign::create_if_missing`]), and its unit test holds `deploy/terraform` to it
//! ([`TableDesign::terraform_mismatches`]): a table declared differently on AWS would make
//! queries fail there only, which no local test would see.

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    BillingMode, GlobalSecondaryIndex, KeyType, Projection, ProjectionType, ScalarAttributeType,
};

use super::{attribute, dynamo_error, key};
use crate::BusError;

/// A key attribute's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    S,
    N,
}

impl Kind {
    fn scalar(self) -> ScalarAttributeType {
        match self {
            Kind::S => ScalarAttributeType::S,
            Kind::N => ScalarAttributeType::N,
        }
    }

    fn terraform(self) -> &'static str {
        match self {
            Kind::S => "S",
            Kind::N => "N",
        }
    }
}

/// A global secondary index (projection ALL, like every index here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Index {
    pub name: &'static str,
    pub hash: &'static str,
    pub range: Option<&'static str>,
}

#[derive(Debug, Clone, Copy)]
pub struct TableDesign {
    pub hash: &'static str,
    pub range: Option<&'static str>,
    /// Every attribute that is a key of the table or of an index, with its type.
    pub attributes: &'static [(&'static str, Kind)],
    pub indexes: &'static [Index],
    /// The TTL attribute (Unix seconds) DynamoDB deletes items by; local servers need none.
    pub ttl: Option<&'static str>,
}

impl TableDesign {
    /// Creates `table` (on-demand capacity) where missing: for local servers and tests; AWS
    /// gets its tables from Terraform.
    pub async fn create_if_missing(&self, client: &Client, table: &str) -> Result<(), BusError> {
        if client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        let mut create = client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(key(self.hash, KeyType::Hash)?);
        if let Some(range) = self.range {
            create = create.key_schema(key(range, KeyType::Range)?);
        }
        for (name, kind) in self.attributes {
            create = create.attribute_definitions(attribute(name, kind.scalar())?);
        }
        for index in self.indexes {
            let mut gsi = GlobalSecondaryIndex::builder()
                .index_name(index.name)
                .key_schema(key(index.hash, KeyType::Hash)?)
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::All)
                        .build(),
                );
            if let Some(range) = index.range {
                gsi = gsi.key_schema(key(range, KeyType::Range)?);
            }
            create = create.global_secondary_indexes(
                gsi.build()
                    .map_err(|e| dynamo_error("index definition", e))?,
            );
        }
        create
            .send()
            .await
            .map_err(|e| dynamo_error(&format!("creating the table {table}"), e))?;
        Ok(())
    }

    /// How `resource "aws_dynamodb_table" "<resource>"` in the Terraform text `hcl` differs
    /// from this design (keys, attribute definitions, indexes and their projection, TTL); empty
    /// when it matches. Reads only the flat `key = "value"` lines and nested blocks Terraform's
    /// own formatting gives such a resource: written here because a full HCL parser is a large
    /// dependency for one test-facing check.
    pub fn terraform_mismatches(&self, hcl: &str, resource: &str) -> Vec<String> {
        let Some(declared) = Declared::parse(hcl, resource) else {
            return vec![format!(
                "no resource \"aws_dynamodb_table\" \"{resource}\" in the Terraform"
            )];
        };
        let mut wrong = Vec::new();
        let mut differ = |what: &str, code: String, terraform: String| {
            if code != terraform {
                wrong.push(format!(
                    "{what}: the code has {code}, Terraform {terraform}"
                ));
            }
        };
        differ(
            "hash key",
            format!("{:?}", Some(self.hash)),
            format!("{:?}", declared.hash.as_deref()),
        );
        differ(
            "range key",
            format!("{:?}", self.range),
            format!("{:?}", declared.range.as_deref()),
        );
        let mut attributes: Vec<(String, String)> = self
            .attributes
            .iter()
            .map(|(name, kind)| ((*name).to_owned(), kind.terraform().to_owned()))
            .collect();
        attributes.sort();
        let mut declared_attributes = declared.attributes.clone();
        declared_attributes.sort();
        differ(
            "attributes",
            format!("{attributes:?}"),
            format!("{declared_attributes:?}"),
        );
        let mut indexes: Vec<(String, String, Option<String>, String)> = self
            .indexes
            .iter()
            .map(|i| {
                (
                    i.name.to_owned(),
                    i.hash.to_owned(),
                    i.range.map(str::to_owned),
                    "ALL".to_owned(),
                )
            })
            .collect();
        indexes.sort();
        let mut declared_indexes = declared.indexes.clone();
        declared_indexes.sort();
        differ(
            "indexes",
            format!("{indexes:?}"),
            format!("{declared_indexes:?}"),
        );
        differ(
            "ttl attribute",
            format!("{:?}", self.ttl),
            format!("{:?}", declared.ttl.as_deref()),
        );
        wrong
    }
}

/// What a Terraform `aws_dynamodb_table` resource declares.
#[derive(Debug, Default)]
struct Declared {
    hash: Option<String>,
    range: Option<String>,
    attributes: Vec<(String, String)>,
    /// (name, hash, range, projection)
    indexes: Vec<(String, String, Option<String>, String)>,
    ttl: Option<String>,
}

impl Declared {
    fn parse(hcl: &str, resource: &str) -> Option<Declared> {
        let header = format!("resource \"aws_dynamodb_table\" \"{resource}\" {{");
        let mut lines = hcl.lines().skip_while(|l| l.trim() != header).skip(1);
        let mut declared = Declared::default();
        // The nested block being read, with its `key = value` pairs.
        let mut block: Option<(String, Vec<(String, String)>)> = None;
        for line in lines.by_ref() {
            let line = line.trim();
            if line == "}" {
                match block.take() {
                    Some((kind, fields)) => declared.add(&kind, &fields),
                    None => return Some(declared),
                }
            } else if let Some(kind) = line.strip_suffix('{') {
                block = Some((kind.trim().to_owned(), Vec::new()));
            } else if let Some((name, value)) = line.split_once('=') {
                let pair = (
                    name.trim().to_owned(),
                    value.trim().trim_matches('"').to_owned(),
                );
                match &mut block {
                    Some((_, fields)) => fields.push(pair),
                    None if pair.0 == "hash_key" => declared.hash = Some(pair.1),
                    None if pair.0 == "range_key" => declared.range = Some(pair.1),
                    None => {}
                }
            }
        }
        None
    }

    fn add(&mut self, kind: &str, fields: &[(String, String)]) {
        let field = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        match kind {
            "attribute" => self.attributes.push((
                field("name").unwrap_or_default(),
                field("type").unwrap_or_default(),
            )),
            "global_secondary_index" => self.indexes.push((
                field("name").unwrap_or_default(),
                field("hash_key").unwrap_or_default(),
                field("range_key"),
                field("projection_type").unwrap_or_default(),
            )),
            "ttl" if field("enabled").as_deref() == Some("true") => {
                self.ttl = field("attribute_name");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN: TableDesign = TableDesign {
        hash: "id",
        range: None,
        attributes: &[("id", Kind::S), ("user_id", Kind::S), ("at", Kind::N)],
        indexes: &[Index {
            name: "user_id-at",
            hash: "user_id",
            range: Some("at"),
        }],
        ttl: Some("purge_at"),
    };

    const TERRAFORM: &str = r#"
resource "aws_dynamodb_table" "other" {
  hash_key = "nope"
}

resource "aws_dynamodb_table" "things" {
  name         = "${var.name_prefix}-things"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "id"

  attribute {
    name = "id"
    type = "S"
  }
  attribute {
    name = "user_id"
    type = "S"
  }
  attribute {
    name = "at"
    type = "N"
  }
  global_secondary_index {
    name            = "user_id-at"
    hash_key        = "user_id"
    range_key       = "at"
    projection_type = "ALL"
  }
  ttl {
    attribute_name = "purge_at"
    enabled        = true
  }
  point_in_time_recovery {
    enabled = true
  }
}
"#;

    #[test]
    fn a_matching_resource_has_no_mismatch() {
        assert_eq!(
            DESIGN.terraform_mismatches(TERRAFORM, "things"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_difference_is_named() {
        let wrong = TERRAFORM
            .replace("type = \"N\"", "type = \"S\"")
            .replace("range_key       = \"at\"", "range_key       = \"id\"")
            .replace("enabled        = true", "enabled        = false");
        let found = DESIGN.terraform_mismatches(&wrong, "things");
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(found[0].starts_with("attributes"));
        assert!(found[1].starts_with("indexes"));
        assert!(found[2].starts_with("ttl"));
        assert_eq!(
            DESIGN.terraform_mismatches(TERRAFORM, "missing").len(),
            1,
            "a missing resource is reported"
        );
        let other_range = TERRAFORM.replace(
            "  hash_key     = \"id\"\n",
            "  hash_key     = \"id\"\n  range_key = \"at\"\n",
        );
        assert_eq!(DESIGN.terraform_mismatches(&other_range, "things").len(), 1);
    }
}
