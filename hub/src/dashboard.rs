//! The hub's web dashboard: three static files compiled into the binary
//! and served at `/`, next to the API they read.
//!
//! The page is plain JavaScript with no build step and no third-party
//! code, so that what runs in the operator's browser is exactly what is in
//! `hub/src/dashboard/`, and a hub on an isolated management network needs
//! nothing from elsewhere. It only polls the JSON API under `/api/v1`
//! (the view on screen, every 2 s); it holds no state of its own.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

/// The page: a skeleton the script fills in.
pub const INDEX_HTML: &str = include_str!("dashboard/index.html");
/// The script: hash routing, polling, rendering.
pub const APP_JS: &str = include_str!("dashboard/app.js");
/// The styles, including the heatmap's status colours.
pub const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// Browsers revalidate on each load, so a hub upgraded in place serves its
/// new page at once.
const CACHE: &str = "no-cache";

/// The page's routes: `/`, `/app.js`, `/style.css`.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/style.css", get(style_css))
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, CACHE),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn content_type(r: &axum::response::Response) -> Option<&HeaderValue> {
        r.headers().get(header::CONTENT_TYPE)
    }

    #[tokio::test]
    async fn each_file_is_served_with_its_content_type() {
        let page = index().await.into_response();
        let script = app_js().await.into_response();
        let styles = style_css().await.into_response();
        assert_eq!(
            content_type(&page).unwrap(),
            "text/html; charset=utf-8",
            "the page"
        );
        assert_eq!(
            content_type(&script).unwrap(),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type(&styles).unwrap(), "text/css; charset=utf-8");
        assert_eq!(page.headers().get(header::CACHE_CONTROL).unwrap(), CACHE);
    }

    #[test]
    fn the_page_loads_its_script_and_styles_from_the_hub_itself() {
        assert!(INDEX_HTML.contains(r#"<script src="/app.js"></script>"#));
        assert!(INDEX_HTML.contains(r#"<link rel="stylesheet" href="/style.css">"#));
    }

    #[test]
    fn nothing_is_fetched_from_another_host() {
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("style.css", STYLE_CSS),
        ] {
            for needle in ["http://", "https://", "src=\"//", "href=\"//", "url(//"] {
                assert!(!text.contains(needle), "{name} contains {needle:?}");
            }
        }
    }

    #[test]
    fn the_script_reads_only_the_hubs_api() {
        // Every fetch goes through one function, and every path it is
        // given starts with the API's prefix.
        assert_eq!(APP_JS.matches("fetch(").count(), 1, "one fetch call");
        for (i, _) in APP_JS.match_indices("api('") {
            assert!(
                APP_JS[i + 5..].starts_with("/api/v1/"),
                "api() called with {:?}",
                &APP_JS[i..(i + 40).min(APP_JS.len())]
            );
        }
    }

    #[test]
    fn the_script_records_its_own_errors_for_inspection() {
        assert!(APP_JS.contains("window.__trellisErrors"));
        assert!(APP_JS.contains("window.onerror"));
        assert!(APP_JS.contains("'unhandledrejection'"));
    }
}
