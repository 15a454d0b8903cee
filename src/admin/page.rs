//! The status page: one server-rendered HTML page on the admin listener with the gateway's
//! state at a glance (readiness, connections, held Pings, the identity cache, the directory,
//! the upstream, the KDC and the fleet store, the CRLs in force) and a search box for an
//! account, a DeviceId or a certificate serial. A plain GET form: no script at all, nothing
//! loaded from elsewhere, and a Content-Security-Policy that would refuse both. Every value a
//! device chose (DeviceId, type, User-Agent) is HTML-escaped: a User-Agent is an attacker's
//! way into the helpdesk's browser.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use http::{header, HeaderValue, Method, StatusCode};

use super::{api::query_param, Admin, Answer};
use crate::clock::{unix_now, utc};
use crate::devices::DeviceState;

const CSP: &str = "default-src 'none'; style-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

const STYLE: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:12px 24px}
header h1{margin:0;font-size:20px}header p{margin:2px 0 0;opacity:.85}
main{padding:16px 24px}h2{font-size:16px;margin:20px 0 8px}
.tiles{display:flex;flex-wrap:wrap;gap:10px;margin:0}
.tile{background:#fff;border:1px solid #d5d9de;border-radius:6px;padding:8px 12px;min-width:150px}
.tile dt{font-size:12px;color:#57606a}.tile dd{margin:2px 0 0;font-size:18px;font-weight:600}
.ok dd{color:#1a7f37}.bad{border-color:#cf222e}.bad dd{color:#cf222e}
form{margin:16px 0;display:flex;gap:8px;align-items:center}
input[type=search]{font-size:15px;padding:6px 8px;width:24em}
button{font-size:15px;padding:6px 14px}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #d5d9de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}tr.refused td.refusal{color:#cf222e;font-weight:600}
small{color:#57606a}.empty{color:#57606a;font-style:italic}
";

impl Admin {
    pub(super) async fn page(&self, method: &Method, path: &str, query: &str) -> Answer {
        if method != Method::GET && method != Method::HEAD {
            return Answer::text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        let mut answer = match path {
            "/" => Answer::new(
                StatusCode::OK,
                "text/html; charset=utf-8",
                self.render(query_param(query, "q").as_deref()).await,
            ),
            "/seg.css" => Answer::new(StatusCode::OK, "text/css", STYLE.to_string()),
            _ => return Answer::text(StatusCode::NOT_FOUND, "not found\n"),
        };
        answer.headers.push((
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ));
        answer.headers.push((
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ));
        answer
    }

    async fn render(&self, search: Option<&str>) -> String {
        let now = unix_now();
        let gateway = self.live.load();
        let replica = gateway.fleet.as_ref().map_or("", |f| f.replica());
        let mut html = String::with_capacity(16 * 1024);
        html.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
        html.push_str("<meta name=\"viewport\" content=\"width=device-width\">");
        html.push_str(
            "<title>seg status</title><link rel=\"stylesheet\" href=\"/seg.css\"></head><body>",
        );
        let _ = write!(
            html,
            "<header><h1>seg{}</h1><p>version {} · serving since {} UTC · page of {} UTC</p></header><main>",
            if replica.is_empty() {
                String::new()
            } else {
                format!(" — replica {}", esc(replica))
            },
            env!("CARGO_PKG_VERSION"),
            utc(self.started),
            utc(now),
        );

        // At a glance.
        html.push_str("<section id=\"state\"><h2>At a glance</h2><dl class=\"tiles\">");
        let failing = self.health.failing();
        tile(
            &mut html,
            "ready",
            "Ready",
            &if failing.is_empty() {
                "ready".to_string()
            } else {
                format!("not ready: {}", failing.join(", "))
            },
            Some(failing.is_empty()),
        );
        let metrics = &self.metrics;
        tile(
            &mut html,
            "connections",
            "Open connections",
            &metrics.open_connections.get().to_string(),
            None,
        );
        tile(
            &mut html,
            "pings",
            "Held Pings",
            &metrics.long_polls.get().to_string(),
            None,
        );
        let lookups = |result: &str| metrics.identity_cache.with_label_values(&[result]).get();
        let (hits, misses) = (
            lookups("hit") + lookups("stale") + lookups("coalesced") + lookups("shared"),
            lookups("miss"),
        );
        tile(
            &mut html,
            "cache",
            "Identity cache",
            &format!(
                "{} entries · {}",
                gateway.resolver.cached_entries().await,
                match hits + misses {
                    0 => "no lookup yet".to_string(),
                    all => format!(
                        "{:.1} % answered without a search",
                        100.0 * hits as f64 / all as f64
                    ),
                }
            ),
            None,
        );
        tile(
            &mut html,
            "devices",
            "Devices known",
            &format!(
                "{} of {}",
                gateway.devices.len(),
                gateway.config.admin.device_capacity
            ),
            None,
        );
        let up = |flag: &std::sync::atomic::AtomicBool| flag.load(Ordering::Acquire);
        let health = &self.health;
        up_tile(
            &mut html,
            "directory",
            "Directory",
            up(&health.directory_up),
        );
        up_tile(&mut html, "upstream", "Upstream", up(&health.upstream_up));
        if gateway.delegation.is_some() {
            up_tile(&mut html, "kdc", "KDC", up(&health.kdc_up));
        }
        if let Some(fleet) = &gateway.fleet {
            up_tile(&mut html, "fleet", "Fleet store", fleet.store_up());
        }
        let revocation = gateway.revocation.load();
        let stale = revocation.stale(now).len();
        tile(
            &mut html,
            "revocation",
            "Revocation",
            &match (revocation.crls().count(), stale) {
                (0, _) => "no CRL in force".to_string(),
                (all, 0) => format!("{all} CRL(s), all current"),
                (all, stale) => format!("{stale} of {all} CRL(s) past nextUpdate"),
            },
            Some(stale == 0),
        );
        html.push_str("</dl></section>");

        // The CRLs in force.
        html.push_str("<section id=\"crls\"><h2>CRLs in force</h2>");
        if revocation.is_empty() {
            html.push_str("<p class=\"empty\">No CRL is in force.</p>");
        } else {
            html.push_str("<table><tr><th>Issuer</th><th>Entries</th><th>Issued</th><th>Next update</th></tr>");
            for crl in revocation.crls() {
                let _ = write!(
                    html,
                    "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&crl.issuer),
                    if crl.delta {
                        " <small>(delta)</small>"
                    } else {
                        ""
                    },
                    crl.entries,
                    when(now, crl.this_update_unix),
                    match crl.next_update_unix {
                        Some(next) if next < now =>
                            format!("<strong>overdue</strong> {}", when(now, next)),
                        Some(next) =>
                            format!("in {} <small>({} UTC)</small>", span(next - now), utc(next)),
                        None => "none".to_string(),
                    },
                );
            }
            html.push_str("</table>");
        }
        html.push_str("</section>");

        // The search.
        let _ = write!(
            html,
            "<form id=\"search\" method=\"get\" action=\"/\"><label for=\"q\">Account, DeviceId or certificate serial</label>\
             <input id=\"q\" type=\"search\" name=\"q\" value=\"{}\" autofocus><button type=\"submit\">Search</button></form>",
            esc(search.unwrap_or(""))
        );
        if let Some(search) = search {
            let found = gateway.devices.search(search);
            let _ = write!(
                html,
                "<section id=\"results\"><h2>Devices for “{}”</h2>",
                esc(search)
            );
            if found.is_empty() {
                html.push_str("<p class=\"empty\">No device of that account, DeviceId or certificate has been seen by this replica.</p>");
            } else {
                devices_table(&mut html, &found, now);
            }
            html.push_str("</section>");
        }

        // The last refusals.
        html.push_str("<section id=\"refusals\"><h2>Recent refusals</h2>");
        let refused = gateway.devices.refused(20);
        if refused.is_empty() {
            html.push_str("<p class=\"empty\">No refusal yet.</p>");
        } else {
            devices_table(&mut html, &refused, now);
        }
        html.push_str("</section></main></body></html>\n");
        html
    }
}

fn tile(html: &mut String, id: &str, name: &str, value: &str, good: Option<bool>) {
    let class = match good {
        Some(true) => "tile ok",
        Some(false) => "tile bad",
        None => "tile",
    };
    let _ = write!(
        html,
        "<div class=\"{class}\" id=\"{id}\"><dt>{}</dt><dd>{}</dd></div>",
        esc(name),
        esc(value)
    );
}

/// A dependency's tile: up (green) or down (red).
fn up_tile(html: &mut String, id: &str, name: &str, up: bool) {
    tile(html, id, name, if up { "up" } else { "down" }, Some(up));
}

/// The table of `devices`, in the shape of `Get-MobileDeviceStatistics`.
fn devices_table(html: &mut String, devices: &[DeviceState], now: i64) {
    html.push_str(
        "<table><tr><th>Account</th><th>Device</th><th>User-Agent</th><th>Last success</th>\
         <th>Last request</th><th>Last refusal</th><th>Ping held</th><th>Certificate</th>\
         <th>Decision</th><th>Replica</th></tr>",
    );
    for d in devices {
        let refused = d.last_refusal_at > 0 && d.last_refusal_at >= d.last_success;
        let _ = write!(
            html,
            "<tr class=\"device{}\" data-device=\"{}\"><td>{}</td><td>{}<br><small>{}</small></td><td>{}</td>\
             <td>{}</td><td>{}</td><td class=\"refusal\">{}</td><td>{}</td>\
             <td>{}<br><small>not after {}</small></td><td>{}</td><td>{}</td></tr>",
            if refused { " refused" } else { "" },
            esc(&d.device_id),
            if d.account.is_empty() {
                format!("<small>not mapped: {}</small>", esc(&d.cert_subject))
            } else {
                esc(&d.account)
            },
            esc(or_dash(&d.device_id)),
            esc(&d.device_type),
            esc(&d.user_agent),
            when(now, d.last_success),
            if d.last_status == 0 {
                format!("TLS handshake refused <small>{}</small>", when(now, d.last_seen))
            } else {
                format!(
                    "{} {} <small>{:.1} ms, {}</small>",
                    esc(or_dash(&d.last_command)),
                    d.last_status,
                    d.last_duration_ms,
                    when(now, d.last_seen)
                )
            },
            if d.last_refusal_at == 0 {
                "-".to_string()
            } else {
                format!("{} <small>{}</small>", esc(d.last_refusal), when(now, d.last_refusal_at))
            },
            if d.ping_held_since == 0 {
                "no".to_string()
            } else {
                format!("since {}", when(now, d.ping_held_since))
            },
            esc(or_dash(&d.cert_serial)),
            if d.cert_not_after == 0 { "-".to_string() } else { utc(d.cert_not_after) },
            if d.mapping.is_empty() {
                "-".to_string()
            } else {
                format!(
                    "{} ({})<br><small>decided {}</small>",
                    esc(d.mapping),
                    esc(d.strength),
                    when(now, d.decided_at)
                )
            },
            esc(or_dash(&d.replica)),
        );
    }
    html.push_str("</table>");
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// `t` as its age, with the UTC time in the title; `-` for never.
fn when(now: i64, t: i64) -> String {
    if t == 0 {
        return "-".to_string();
    }
    format!(
        "<span title=\"{} UTC\">{} ago</span>",
        utc(t),
        span(now - t)
    )
}

/// A number of seconds as a person reads it.
fn span(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=119 => format!("{s} s"),
        120..=7_199 => format!("{} min", s / 60),
        7_200..=172_799 => format!("{} h", s / 3_600),
        _ => format!("{} d", s / 86_400),
    }
}

/// `text` safe inside HTML text and double- or single-quoted attributes.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_device_chose_is_escaped() {
        assert_eq!(
            esc("<img src=x onerror='a()'>&\""),
            "&lt;img src=x onerror=&#39;a()&#39;&gt;&amp;&quot;"
        );
        assert_eq!(span(59), "59 s");
        assert_eq!(span(3_600), "60 min");
        assert_eq!(span(86_400 * 3), "3 d");
    }
}
