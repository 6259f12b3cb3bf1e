# Sign-in with Amazon Cognito: a user pool (e-mail addresses as user names), its `admin` group,
# a public app client for the web shop (authorization code + PKCE, no secret) and a Cognito
# domain for the managed login pages. Every service verifies the pool's access tokens as an
# external issuer (auth.issuers: k8s_settings_env writes MERCATO_AUTH__ISSUERS), next to
# Mercato's own issuer; see docs/deploy.md, "Sign-in with Amazon Cognito".

locals {
  # The `iss` of the pool's tokens, and its signing keys.
  cognito_issuer   = "https://${aws_cognito_user_pool.mercato.endpoint}"
  cognito_jwks_url = "${local.cognito_issuer}/.well-known/jwks.json"
  # Cognito access tokens carry the app client in `client_id` (they have no `aud`) and the
  # user's groups in `cognito:groups`; members of the admin group are Mercato admins. The
  # value is one TOML inline array (figment parses environment values so); jsonencode writes
  # each string as a quoted, escaped TOML basic string.
  cognito_issuers_setting = "[{issuer=${jsonencode(local.cognito_issuer)}, jwks_url=${jsonencode(local.cognito_jwks_url)}, audience=${jsonencode(aws_cognito_user_pool_client.web.id)}, audience_claim=\"client_id\", roles_claim=\"cognito:groups\", admin_roles=${jsonencode([aws_cognito_user_group.admin.name])}}]"
}

resource "aws_cognito_user_pool" "mercato" {
  name = var.name_prefix
  # ESSENTIALS: managed login and password reuse prevention; PLUS adds threat protection
  # (compromised credentials, adaptive authentication), enforced below when chosen.
  user_pool_tier      = var.cognito_user_pool_tier
  deletion_protection = "ACTIVE"

  # Users sign in with their e-mail address, verified by a code before the account is usable.
  username_attributes      = ["email"]
  auto_verified_attributes = ["email"]
  username_configuration {
    case_sensitive = false
  }
  # A changed address stays unverified (and unused for sign-in) until its code is confirmed.
  user_attribute_update_settings {
    attributes_require_verification_before_update = ["email"]
  }
  verification_message_template {
    default_email_option = "CONFIRM_WITH_CODE"
  }

  admin_create_user_config {
    allow_admin_create_user_only = !var.cognito_self_sign_up
  }

  password_policy {
    minimum_length                   = 12
    require_lowercase                = true
    require_uppercase                = true
    require_numbers                  = true
    require_symbols                  = true
    password_history_size            = 5
    temporary_password_validity_days = 3
  }

  # Authenticator apps (TOTP), chosen by each user; SMS needs an SNS setup this module does not make.
  mfa_configuration = var.cognito_mfa
  software_token_mfa_configuration {
    enabled = true
  }

  account_recovery_setting {
    recovery_mechanism {
      name     = "verified_email"
      priority = 1
    }
  }

  dynamic "user_pool_add_ons" {
    for_each = var.cognito_user_pool_tier == "PLUS" ? [1] : []
    content {
      advanced_security_mode = "ENFORCED"
    }
  }
}

# Mercato admins: the group's name is the admin role in MERCATO_AUTH__ISSUERS (admin_roles).
resource "aws_cognito_user_group" "admin" {
  name         = "admin"
  user_pool_id = aws_cognito_user_pool.mercato.id
  description  = "Mercato administrators (admin_roles of the Cognito issuer in auth.issuers)"
  precedence   = 0
}

# The web shop: a public client (it runs in the browser, so it holds no secret) using the
# authorization-code flow through the managed login pages, with PKCE (S256): Cognito verifies
# the code_challenge a client sends but has no setting to require one, so the shop must always
# send it (a public client without PKCE is open to code interception). Access and ID tokens
# live 15 minutes; refresh tokens rotate on every use (the old one stays valid for a short
# retry grace period), which rules out the REFRESH_TOKEN_AUTH flow: refresh through the token
# endpoint or GetTokensFromRefreshToken.
resource "aws_cognito_user_pool_client" "web" {
  name            = "${var.name_prefix}-web"
  user_pool_id    = aws_cognito_user_pool.mercato.id
  generate_secret = false

  allowed_oauth_flows_user_pool_client = true
  allowed_oauth_flows                  = ["code"]
  allowed_oauth_scopes                 = ["openid", "email", "profile"]
  supported_identity_providers         = ["COGNITO"]
  callback_urls                        = var.cognito_callback_urls
  logout_urls                          = var.cognito_logout_urls

  # SRP only (the password never leaves the browser); no USER_PASSWORD_AUTH.
  explicit_auth_flows = ["ALLOW_USER_SRP_AUTH"]

  access_token_validity  = 15
  id_token_validity      = 15
  refresh_token_validity = var.cognito_refresh_token_days
  token_validity_units {
    access_token  = "minutes"
    id_token      = "minutes"
    refresh_token = "days"
  }
  refresh_token_rotation {
    feature                    = "ENABLED"
    retry_grace_period_seconds = 10
  }

  enable_token_revocation       = true
  prevent_user_existence_errors = "ENABLED"
}

# The managed login pages at https://PREFIX.auth.REGION.amazoncognito.com (the classic hosted UI,
# version 1: version 2 needs a branding style this provider version cannot create).
resource "aws_cognito_user_pool_domain" "mercato" {
  domain                = coalesce(var.cognito_domain_prefix, var.name_prefix)
  user_pool_id          = aws_cognito_user_pool.mercato.id
  managed_login_version = 1
}
