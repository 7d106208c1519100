// Trellis dashboard: plain JavaScript, no framework, no build step.
//
// Hash routes: #/ (overview), #/site/REGION/SITE, #/rollouts, #/incidents,
// #/audit. Only the view on screen is polled, every POLL_MS, one request
// round at a time. The API's errors go to a banner and are never thrown;
// the script's own errors are kept in window.__trellisErrors and shown.
'use strict';

(function () {
  const POLL_MS = 2000;
  const REQUEST_TIMEOUT_MS = 10000;
  const EVENTS_SHOWN = 50;
  const AUDIT_SHOWN = 100;
  const AUDIT_PAGE = 1000;
  const STALE_LISTED = 20;
  const STATUSES = ['healthy', 'degraded', 'critical', 'empty', 'unreachable'];

  // ---- errors -----------------------------------------------------------

  window.__trellisErrors = window.__trellisErrors || [];

  function recordScriptError(text) {
    window.__trellisErrors.push(String(text));
    const box = document.getElementById('script-errors');
    if (box) {
      box.hidden = false;
      box.textContent = 'The dashboard hit an error (reload the page; if it persists, report it):\n' +
        window.__trellisErrors.slice(-5).join('\n');
    }
  }

  window.onerror = function (message, source, line, column, error) {
    recordScriptError((error && error.stack) || (message + ' at ' + source + ':' + line + ':' + column));
    return false;
  };
  window.addEventListener('unhandledrejection', function (e) {
    const r = e.reason;
    recordScriptError('unhandled rejection: ' + ((r && r.stack) || r));
  });

  /** An answer from the API that is not a success, or no answer. */
  class ApiError extends Error {
    constructor(path, status, message) {
      super(message);
      this.path = path;
      this.status = status;
    }
  }

  function showApiError(err) {
    const box = document.getElementById('banner');
    box.hidden = false;
    const what = err instanceof ApiError
      ? (err.status ? 'HTTP ' + err.status + ' from ' : '') + err.path + ': ' + err.message
      : String(err);
    box.textContent = 'The hub\'s API did not answer as expected; showing the last data received. ' + what;
  }

  function clearApiError() {
    const box = document.getElementById('banner');
    box.hidden = true;
    box.textContent = '';
  }

  // ---- helpers ----------------------------------------------------------

  /** GETs a path of the hub's API and parses its JSON. */
  async function api(path) {
    const ctl = new AbortController();
    const timer = setTimeout(function () { ctl.abort(); }, REQUEST_TIMEOUT_MS);
    let res;
    try {
      res = await fetch(path, { signal: ctl.signal, headers: { accept: 'application/json' } });
    } catch (e) {
      throw new ApiError(path, 0, e.name === 'AbortError'
        ? 'no answer within ' + REQUEST_TIMEOUT_MS / 1000 + ' s; is the hub overloaded?'
        : 'the hub is unreachable (' + e.message + '); is it running?');
    } finally {
      clearTimeout(timer);
    }
    const text = await res.text();
    let body = null;
    try {
      body = JSON.parse(text);
    } catch (e) {
      body = null;
    }
    if (!res.ok) {
      const msg = body && typeof body.error === 'string' ? body.error : text.slice(0, 200);
      throw new ApiError(path, res.status, msg);
    }
    if (body === null) {
      throw new ApiError(path, res.status, 'the answer is not JSON');
    }
    return body;
  }

  function esc(v) {
    return String(v === null || v === undefined ? '' : v)
      .replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
      .replace(/"/g, '&quot;').replace(/'/g, '&#39;');
  }

  function num(v) {
    return typeof v === 'number' && isFinite(v) ? v : 0;
  }

  function ago(seconds) {
    const s = Math.max(0, Math.round(num(seconds)));
    if (s < 90) return s + ' s';
    if (s < 90 * 60) return Math.round(s / 60) + ' min';
    if (s < 36 * 3600) return Math.round(s / 3600) + ' h';
    return Math.round(s / 86400) + ' d';
  }

  function when(ms) {
    if (!ms) return '';
    const d = new Date(ms);
    return isNaN(d.getTime()) ? '' : d.toLocaleString();
  }

  function pct(v) {
    return typeof v === 'number' ? v + ' %' : '–';
  }

  function ratio(v) {
    return (num(v) * 100).toFixed(1) + ' %';
  }

  function siteHref(region, site) {
    return '#/site/' + encodeURIComponent(region) + '/' + encodeURIComponent(site);
  }

  function badge(cls, text) {
    return '<span class="badge s-' + esc(cls) + '">' + esc(text) + '</span>';
  }

  /** A progress bar of parts `[[class, count], …]` out of `total`. */
  function bar(parts, total, testid) {
    const t = Math.max(1, num(total));
    const inner = parts.map(function (p) {
      const w = Math.min(100, (num(p[1]) * 100) / t);
      return w > 0 ? '<i class="' + p[0] + '" style="width:' + w.toFixed(2) + '%"></i>' : '';
    }).join('');
    return '<span class="bar"' + (testid ? ' data-testid="' + esc(testid) + '"' : '') + '>' + inner + '</span>';
  }

  function setUpdated(hub) {
    if (hub) document.getElementById('hub').textContent = 'hub ' + hub;
    document.getElementById('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
  }

  /** One line for an event record (kind plus what it carries). */
  function describeRecord(r) {
    const body = r.body || {};
    if (body.Gap) {
      const g = body.Gap;
      return 'records ' + r.seq + '–' + g.until + ' lost (' + num(g.events_dropped) +
        ' events, ' + num(g.summaries_dropped) + ' summaries dropped)';
    }
    const ev = body.Event;
    if (!ev || typeof ev !== 'object') return JSON.stringify(body);
    const name = Object.keys(ev)[0];
    const e = ev[name] || {};
    switch (name) {
      case 'NodeJoined': return e.node + ' joined';
      case 'NodeDied': return e.node + ' died';
      case 'NodeRecovered': return e.node + ' recovered';
      case 'CheckChanged':
        return e.node + ' check ' + e.check + ': ' + e.from + ' → ' + e.to + (e.detail ? ' (' + e.detail + ')' : '');
      case 'ConfigResult':
        return e.node + ' config v' + (e.result && e.result.version) + ': ' + JSON.stringify(e.result && e.result.outcome) +
          (e.result && e.result.detail ? ' (' + e.result.detail + ')' : '');
      case 'ConfigDrift':
        return e.node + ' drift of ' + (e.drift && e.drift.path) + ' (' + JSON.stringify(e.drift && e.drift.action) + ')';
      case 'PatchState':
        return e.node + ' patch run ' + (e.state && e.state.run) + ': ' + patchText(e.state);
      case 'PatchSiteRolledBack':
        return 'site rolled back run ' + e.run + ': ' + e.reason;
      default:
        return name + ' ' + JSON.stringify(e);
    }
  }

  function patchText(p) {
    if (!p) return '';
    const state = typeof p.state === 'string' ? p.state : JSON.stringify(p.state);
    return state + (p.failed ? ' (failed' + (p.detail ? ': ' + p.detail : '') + ')' : '');
  }

  // ---- views ------------------------------------------------------------

  // Each view: enter(root) builds its skeleton once, refresh(isCurrent)
  // fetches and fills it in. isCurrent() turns false when the operator
  // navigates away, so a late answer does not draw over another view.

  function overviewView() {
    let rows = [];
    let lastHtml = '';
    let root;

    function enter(el) {
      root = el;
      root.innerHTML =
        '<h2>Fleet</h2>' +
        '<div class="cards" data-testid="totals"></div>' +
        '<div class="filter">' +
        '<input type="search" placeholder="Filter: site or region name" data-testid="filter" id="filter">' +
        '<select id="status-filter" data-testid="status-filter"><option value="">any status</option>' +
        STATUSES.map(function (s) { return '<option value="' + s + '">' + s + '</option>'; }).join('') +
        '</select><span class="muted" data-testid="shown"></span></div>' +
        '<div class="legend">' + STATUSES.map(function (s) {
          return '<span><i class="s-' + s + '"></i>' + s + '</span>';
        }).join('') + '</div>' +
        '<div data-testid="heatmap" id="heatmap"></div>' +
        '<div class="stale-list" data-testid="unreachable"></div>';
      let pending = 0;
      const redraw = function () {
        clearTimeout(pending);
        pending = setTimeout(drawHeatmap, 80);
      };
      root.querySelector('#filter').addEventListener('input', redraw);
      root.querySelector('#status-filter').addEventListener('change', redraw);
      // Tooltips are built on hover, so the heatmap's HTML stays the same
      // from poll to poll while only ages change.
      root.querySelector('#heatmap').addEventListener('mouseover', function (e) {
        const t = e.target;
        if (!t.classList || !t.classList.contains('t')) return;
        const r = rows[Number(t.dataset.i)];
        if (r) t.title = tooltip(r);
      });
    }

    function tooltip(r) {
      const lines = [r.region + ' / ' + r.site + ': ' + r.status,
        num(r.nodes_alive) + ' of ' + num(r.nodes_total) + ' nodes alive'];
      if (r.dead && r.dead.length) lines.push('dead: ' + r.dead.slice(0, 10).join(', ') + (r.dead.length > 10 ? ', …' : ''));
      const failing = Object.keys(r.failing_checks || {});
      if (failing.length) lines.push('failing checks: ' + failing.slice(0, 10).join(', '));
      lines.push((r.status === 'unreachable' ? 'NOT REACHABLE, last heard ' : 'last heard ') + ago(r.last_seen_s) + ' ago');
      if (!r.connected) lines.push('relay uplink down');
      return lines.join('\n');
    }

    function drawTotals(f) {
      const t = f.totals || {};
      const by = t.by_status || {};
      const sites = t.sites_by_status || {};
      const card = function (n, label, testid) {
        return '<div class="card"><div class="n" data-testid="' + testid + '">' + esc(n) +
          '</div><div class="l">' + esc(label) + '</div></div>';
      };
      root.querySelector('[data-testid=totals]').innerHTML =
        card(num(t.sites), 'sites', 'total-sites') +
        STATUSES.map(function (s) { return card(num(sites[s]), 'sites ' + s, 'sites-' + s); }).join('') +
        card(num(t.nodes_total), 'nodes', 'total-nodes') +
        card(num(t.nodes_alive), 'nodes alive', 'nodes-alive') +
        card(num(t.nodes_dead), 'nodes dead', 'nodes-dead') +
        ['passing', 'warning', 'critical', 'unknown'].map(function (s) {
          return card(num(by[s]), 'nodes ' + s, 'nodes-' + s);
        }).join('');
    }

    function matches(r, words, status) {
      if (status && r.status !== status) return false;
      for (const w of words) {
        if (r.site.toLowerCase().indexOf(w) < 0 && r.region.toLowerCase().indexOf(w) < 0) return false;
      }
      return true;
    }

    function drawHeatmap() {
      if (!root) return;
      const words = root.querySelector('#filter').value.toLowerCase().split(/\s+/).filter(Boolean);
      const status = root.querySelector('#status-filter').value;
      const regions = new Map();
      let shown = 0;
      rows.forEach(function (r, i) {
        if (!matches(r, words, status)) return;
        shown += 1;
        let list = regions.get(r.region);
        if (!list) {
          list = [];
          regions.set(r.region, list);
        }
        list.push(i);
      });
      const parts = [];
      Array.from(regions.keys()).sort().forEach(function (region) {
        const list = regions.get(region);
        const bad = list.filter(function (i) { return rows[i].status === 'unreachable'; }).length;
        parts.push('<div class="region"><h3>' + esc(region) + ' <span class="muted">' + list.length + ' sites' +
          (bad ? ', ' + bad + ' unreachable' : '') + '</span></h3><div class="tiles">');
        for (const i of list) {
          const r = rows[i];
          parts.push('<a class="t s-' + esc(r.status) + '" data-i="' + i + '" href="' + esc(siteHref(r.region, r.site)) +
            '" aria-label="' + esc(r.site + ' ' + r.status) + '"></a>');
        }
        parts.push('</div></div>');
      });
      if (!parts.length) parts.push('<p class="muted">' + (rows.length ? 'No site matches the filter.' : 'No site has reported to this hub yet.') + '</p>');
      const html = parts.join('');
      if (html !== lastHtml) {
        root.querySelector('#heatmap').innerHTML = html;
        lastHtml = html;
      }
      root.querySelector('[data-testid=shown]').textContent =
        shown === rows.length ? rows.length + ' sites' : shown + ' of ' + rows.length + ' sites shown';
      drawUnreachable();
    }

    function drawUnreachable() {
      const stale = rows.filter(function (r) { return r.status === 'unreachable'; })
        .sort(function (a, b) { return num(b.last_seen_s) - num(a.last_seen_s); });
      const el = root.querySelector('[data-testid=unreachable]');
      if (!stale.length) {
        el.innerHTML = '';
        return;
      }
      el.innerHTML = '<h3>Unreachable sites (last known state shown, not current)</h3><ul>' +
        stale.slice(0, STALE_LISTED).map(function (r) {
          return '<li><a href="' + esc(siteHref(r.region, r.site)) + '">' + esc(r.region + ' / ' + r.site) +
            '</a>: last heard ' + esc(ago(r.last_seen_s)) + ' ago</li>';
        }).join('') + (stale.length > STALE_LISTED ? '<li>and ' + (stale.length - STALE_LISTED) + ' more</li>' : '') +
        '</ul>';
    }

    async function refresh(isCurrent) {
      const f = await api('/api/v1/fleet');
      if (!isCurrent()) return;
      rows = (f.sites || []).map(function (r) {
        return Object.assign({}, r, { site: String(r.site), region: String(r.region), status: STATUSES.indexOf(r.status) >= 0 ? r.status : 'empty' });
      });
      drawTotals(f);
      drawHeatmap();
      setUpdated(f.hub);
    }

    return { name: 'overview', enter: enter, refresh: refresh };
  }

  function siteView(region, site) {
    let root;

    function enter(el) {
      root = el;
      root.innerHTML =
        '<p><a href="#/">← Overview</a></p>' +
        '<h2 data-testid="site-title">' + esc(region) + ' / ' + esc(site) + '</h2>' +
        '<div data-testid="site-summary"></div>' +
        '<h3>Nodes</h3><div data-testid="nodes"><p class="muted">Asking the site\'s relay…</p></div>' +
        '<h3>Rollout</h3><div data-testid="site-rollout"></div>' +
        '<h3>Recent events</h3><div data-testid="site-events"></div>';
    }

    function drawSummary(row) {
      const el = root.querySelector('[data-testid=site-summary]');
      if (!row) {
        el.innerHTML = '<p class="muted">This site is not in the hub\'s fleet view.</p>';
        return;
      }
      const c = row.config || {};
      const versions = Object.keys(c.versions || {}).map(function (v) { return 'v' + v + ': ' + c.versions[v]; }).join(', ');
      el.innerHTML = '<div class="cards">' +
        '<div class="card"><div class="n" data-testid="site-status">' + badge(row.status, row.status) + '</div><div class="l">status</div></div>' +
        '<div class="card"><div class="n" data-testid="site-alive">' + num(row.nodes_alive) + '</div><div class="l">alive</div></div>' +
        '<div class="card"><div class="n" data-testid="site-dead">' + num(row.nodes_dead) + '</div><div class="l">dead</div></div>' +
        '<div class="card"><div class="n">' + esc(ago(row.last_seen_s)) + '</div><div class="l">since last heard</div></div>' +
        '</div><p>Relay <b>' + esc(row.relay) + '</b>, ' + (row.connected ? 'connected' + (row.hub ? ' to ' + esc(row.hub) : '') : '<b>uplink down</b>') +
        '. Configuration offered: ' + (c.offered ? 'v' + esc(c.offered) : 'none') +
        (versions ? '; nodes by version: ' + esc(versions) : '') +
        (num(c.drifted_count) ? '; <b>' + num(c.drifted_count) + ' drifted</b>' : '') +
        (num(c.failing_count) ? '; <b>' + num(c.failing_count) + ' failing</b>' : '') + '.</p>' +
        (row.status === 'unreachable' ? '<p><b>The hub cannot reach this site\'s relay: what is shown is the last known state.</b></p>' : '');
    }

    function drawNodes(report, row, latest) {
      const c = (row && row.config) || {};
      const drifted = new Set(c.drifted || []);
      const failing = new Map((c.failing || []).map(function (p) { return [p[0], p[1]]; }));
      const nodes = (report.nodes || []).slice().sort(function (a, b) { return String(a.name).localeCompare(String(b.name)); });
      const head = '<table data-testid="nodes-table"><tr><th>node</th><th>role</th><th>alive</th><th>status</th><th>failing checks</th>' +
        '<th>cpu</th><th>mem</th><th>disk</th><th>load</th><th>config</th><th>patch</th></tr>';
      const body = nodes.map(function (n) {
        const bad = (n.checks || []).filter(function (k) { return k.status !== 'passing'; });
        const cfg = [];
        const ver = latest.config.get(n.name);
        if (ver) cfg.push('v' + ver);
        if (drifted.has(n.name)) cfg.push('<b>drifted</b>');
        if (failing.has(n.name)) cfg.push('<b>failing v' + esc(failing.get(n.name)) + '</b>');
        return '<tr data-testid="node-row" data-node="' + esc(n.name) + '" data-alive="' + (n.alive ? 'true' : 'false') + '"' +
          (n.alive ? '' : ' class="dead"') + '><td>' + esc(n.name) + '</td><td>' + esc(n.role || '') + '</td><td>' +
          (n.alive ? 'yes' : badge('dead', 'dead')) + '</td><td>' + badge(n.status, n.status) + '</td><td>' +
          bad.map(function (k) { return esc(k.name) + ' ' + badge(k.status, k.status) + (k.detail ? ' <span class="muted">' + esc(k.detail) + '</span>' : ''); }).join('<br>') +
          '</td><td class="num">' + pct(n.cpu_pct) + '</td><td class="num">' + pct(n.mem_pct) + '</td><td class="num">' + pct(n.disk_pct) +
          '</td><td class="num">' + (typeof n.load1 === 'number' ? n.load1.toFixed(2) : '–') + '</td><td>' + cfg.join(' ') +
          '</td><td>' + esc(latest.patch.get(n.name) || '') + '</td></tr>';
      }).join('');
      root.querySelector('[data-testid=nodes]').innerHTML = nodes.length
        ? head + body + '</table><p class="muted">Config version and patch state: the newest reported in the events below.</p>'
        : '<p class="muted">The relay knows no node.</p>';
    }

    function drawRollout(view) {
      const el = root.querySelector('[data-testid=site-rollout]');
      const s = view && (view.sites || []).find(function (x) { return x.site === site && x.region === region; });
      if (!s) {
        el.innerHTML = '<p class="muted">' + (view ? 'The latest rollout (run ' + esc(view.record.run) + ') does not include this site.' : 'No rollout yet.') + '</p>';
        return;
      }
      el.innerHTML = '<p>Run ' + esc(view.record.run) + ' (' + esc(view.record.name) + ' ' + esc(view.record.version) + ', ' + esc(view.record.state) + '): ' +
        num(s.patched) + ' of ' + num(s.planned) + ' planned nodes patched ' + bar([['done', s.patched]], s.planned) +
        ' ' + esc(Object.keys(s.states || {}).map(function (k) { return k + ' ' + s.states[k]; }).join(', ')) +
        (s.local ? ' <b>rolled back by the relay: ' + esc(s.local) + '</b>' : '') + '</p>';
    }

    function drawEvents(report) {
      const recs = (report.records || []).slice(-EVENTS_SHOWN).reverse();
      root.querySelector('[data-testid=site-events]').innerHTML = recs.length
        ? '<table data-testid="events-table"><tr><th>when</th><th>kind</th><th>what</th></tr>' + recs.map(function (r) {
          return '<tr><td>' + esc(when(r.at_ms)) + '</td><td>' + esc(r.kind) + '</td><td>' + esc(describeRecord(r)) + '</td></tr>';
        }).join('') + '</table>' + (report.truncated ? '<p class="muted">More events exist than one request returns; the newest of the first page are shown.</p>' : '')
        : '<p class="muted">No event in the last 24 hours.</p>';
    }

    /** The newest config version and patch state each node reported. */
    function latestByNode(report) {
      const config = new Map();
      const patch = new Map();
      for (const r of report.records || []) {
        const ev = r.body && r.body.Event;
        if (!ev) continue;
        if (ev.ConfigResult && ev.ConfigResult.result) config.set(ev.ConfigResult.node, ev.ConfigResult.result.version);
        if (ev.PatchState) patch.set(ev.PatchState.node, 'run ' + ev.PatchState.state.run + ': ' + patchText(ev.PatchState.state));
      }
      return { config: config, patch: patch };
    }

    async function refresh(isCurrent) {
      const q = '?region=' + encodeURIComponent(region);
      const since = Date.now() - 24 * 3600 * 1000;
      const answers = await Promise.allSettled([
        api('/api/v1/sites/' + encodeURIComponent(site) + '/nodes' + q),
        api('/api/v1/fleet'),
        api('/api/v1/events?site=' + encodeURIComponent(site) + '&region=' + encodeURIComponent(region) + '&since=' + since + '&limit=10000'),
        api('/api/v1/rollouts'),
      ]);
      if (!isCurrent()) return;
      const [nodes, fleet, events, rollouts] = answers;
      let view = null;
      const failed = answers.filter(function (a) { return a.status === 'rejected'; }).map(function (a) { return a.reason; });
      if (rollouts.status === 'fulfilled' && (rollouts.value.rollouts || []).length) {
        try {
          view = await api('/api/v1/rollouts/latest');
        } catch (e) {
          failed.push(e);
        }
        if (!isCurrent()) return;
      }
      const row = fleet.status === 'fulfilled'
        ? (fleet.value.sites || []).find(function (r) { return r.site === site && r.region === region; })
        : null;
      if (fleet.status === 'fulfilled') drawSummary(row);
      const latest = events.status === 'fulfilled' ? latestByNode(events.value) : { config: new Map(), patch: new Map() };
      if (nodes.status === 'fulfilled') drawNodes(nodes.value, row, latest);
      if (events.status === 'fulfilled') drawEvents(events.value);
      if (rollouts.status === 'fulfilled') drawRollout(view);
      setUpdated(fleet.status === 'fulfilled' ? fleet.value.hub : null);
      if (failed.length) throw failed[0];
    }

    return { name: 'overview', enter: enter, refresh: refresh };
  }

  function rolloutsView() {
    let root;

    function enter(el) {
      root = el;
      root.innerHTML = '<h2>Latest rollout</h2><div data-testid="rollout-latest"></div>' +
        '<h2>All rollouts</h2><div data-testid="rollout-list"></div>';
    }

    function drawList(list) {
      root.querySelector('[data-testid=rollout-list]').innerHTML = list.length
        ? '<table><tr><th>run</th><th>patch</th><th>state</th><th>waves</th><th>started by</th><th>started</th><th>changed</th><th>reason</th></tr>' +
          list.map(function (r) {
            return '<tr><td class="num">' + esc(r.run) + '</td><td>' + esc(r.name + ' ' + r.version) + '</td><td>' + esc(r.state) +
              '</td><td>' + esc(num(r.started) + ' of ' + num(r.waves) + ' (' + r.spec + ')') + '</td><td>' + esc(r.started_by) +
              '</td><td>' + esc(when(r.started_ms)) + '</td><td>' + esc(when(r.changed_ms)) + '</td><td>' + esc(r.reason || '') + '</td></tr>';
          }).join('') + '</table>'
        : '<p class="muted">No rollout has been started on this fleet.</p>';
    }

    function gateText(g) {
      if (!g) return '';
      const p = g.patched || {};
      const b = g.baseline || {};
      const v = g.verdict || {};
      const verdict = v.pass === null || v.pass === undefined ? 'waiting (patched nodes still pending)' : v.pass ? 'passes' : 'FAILS';
      return 'Wave ' + num(g.wave) + ' gate ' + verdict + ': ' + num(p.failed) + ' of ' + (num(p.healthy) + num(p.failed) + num(p.pending)) +
        ' patched nodes failed (' + ratio(v.patched_failure_ratio) + '), ' + num(p.pending) + ' pending; threshold ' + ratio(v.threshold) +
        ' (baseline ' + ratio(v.baseline_failure_ratio) + ' of ' + (num(b.healthy) + num(b.failed)) + ' unpatched nodes + margin)';
    }

    function drawLatest(v) {
      const el = root.querySelector('[data-testid=rollout-latest]');
      if (!v) {
        el.innerHTML = '<p class="muted">No rollout yet.</p>';
        return;
      }
      const r = v.record;
      el.innerHTML =
        '<p><b>Run ' + esc(r.run) + '</b>: ' + esc(r.name + ' ' + r.version) + ', <b data-testid="rollout-state">' + esc(r.state) +
        '</b>, waves ' + esc(r.spec) + ', started by ' + esc(r.started_by) + ' ' + esc(when(r.started_ms)) +
        ', bake ' + esc(Math.round(num(r.bake_ms) / 1000)) + ' s, margin ' + ratio(r.max_failure) +
        ', automatic rollback ' + (r.auto_rollback ? 'on' : 'off') + '.</p>' +
        (r.reason ? '<p>Reason: <b>' + esc(r.reason) + '</b></p>' : '') +
        '<div class="gate" data-testid="rollout-gate">' + esc(gateText(v.gate)) + '</div>' +
        (r.failed_gate ? '<p>Failed gate: ' + esc(gateText(r.failed_gate)) + '</p>' : '') +
        '<h3>Waves</h3><table><tr><th>wave</th><th>spec</th><th>phase</th><th>nodes</th><th>sites</th><th>progress</th><th>healthy / failed / pending</th><th>rolled back</th></tr>' +
        (v.waves || []).map(function (w) {
          const c = w.counts || {};
          return '<tr><td class="num">' + num(w.index) + '</td><td>' + esc(w.spec) + '</td><td>' + esc(w.phase) + '</td><td class="num">' +
            num(w.nodes) + '</td><td class="num">' + num(w.sites) + '</td><td>' +
            bar([['healthy', c.healthy], ['failed', c.failed], ['pending', c.pending]], w.nodes, 'wave-bar') + '</td><td>' +
            num(c.healthy) + ' / ' + num(c.failed) + ' / ' + num(c.pending) + '</td><td class="num">' + num(w.rolled_back) + '</td></tr>';
        }).join('') + '</table>' +
        '<h3>Sites</h3><table><tr><th>site</th><th>patched</th><th>progress</th><th>states</th><th>relay</th></tr>' +
        (v.sites || []).map(function (s) {
          return '<tr><td><a href="' + esc(siteHref(s.region, s.site)) + '">' + esc(s.region + ' / ' + s.site) + '</a></td><td class="num">' +
            num(s.patched) + ' of ' + num(s.planned) + '</td><td>' + bar([['done', s.patched]], s.planned) + '</td><td>' +
            esc(Object.keys(s.states || {}).map(function (k) { return k + ' ' + s.states[k]; }).join(', ')) + '</td><td>' +
            esc(s.action || 'not reported') + (s.local ? ' — rolled back by the relay: ' + esc(s.local) : '') + '</td></tr>';
        }).join('') + '</table>';
    }

    async function refresh(isCurrent) {
      const list = await api('/api/v1/rollouts');
      if (!isCurrent()) return;
      const rows = list.rollouts || [];
      // Only ask for the latest when there is one: no request that is
      // known to answer "not found".
      const latest = rows.length ? await api('/api/v1/rollouts/latest') : null;
      if (!isCurrent()) return;
      drawList(rows);
      drawLatest(latest);
      setUpdated(null);
    }

    return { name: 'rollouts', enter: enter, refresh: refresh };
  }

  function incidentsView() {
    let root;

    function enter(el) {
      root = el;
      root.innerHTML = '<h2>Incidents</h2><div data-testid="incidents"></div>';
    }

    function row(i) {
      const open = i.resolved_ms === null || i.resolved_ms === undefined;
      // A region's own incident has no site.
      const scope = i.scope.region + (i.scope.site ? '/' + i.scope.site : '') + (i.scope.node ? '/' + i.scope.node : '');
      const since = ago(Math.max(0, (Date.now() - i.opened_ms) / 1000));
      const cause = i.cause
        ? 'rollout ' + i.cause.run + ' (' + i.cause.name + ' ' + i.cause.version + '), wave ' + i.cause.wave
        : '';
      const nodes = (i.nodes || []).length;
      return '<tr class="' + (open ? 'sev-' + esc(i.severity) : 'muted') + '" data-testid="incident">' +
        '<td>' + esc(i.id) + '</td>' +
        '<td>' + esc(open ? i.severity : 'resolved') + '</td>' +
        '<td>' + esc(i.title) +
          (typeof i.score === 'number' ? ' <span class="muted" data-testid="incident-score">score ' + esc(i.score) + '</span>' : '') +
          (i.detail ? '<br><span class="muted">' + esc(i.detail) + '</span>' : '') + '</td>' +
        '<td class="mono">' + esc(scope) + '</td>' +
        '<td>' + esc(nodes ? String(nodes) : '') + '</td>' +
        '<td>' + esc(since) + '</td>' +
        '<td>' + esc(cause) + '</td></tr>';
    }

    async function refresh(isCurrent) {
      let body;
      try {
        body = await api('/api/v1/incidents?state=all');
      } catch (e) {
        if (e instanceof ApiError && e.status === 404) {
          if (!isCurrent()) return;
          root.querySelector('[data-testid=incidents]').innerHTML =
            '<p class="muted" data-testid="incidents-unavailable">Incidents are not available on this hub.</p>';
          return;
        }
        throw e;
      }
      if (!isCurrent()) return;
      const list = Array.isArray(body.incidents) ? body.incidents : [];
      root.querySelector('[data-testid=incidents]').innerHTML = list.length
        ? '<p data-testid="incidents-open">' + esc(body.open) + ' open</p>' +
          '<table data-testid="incidents-table"><tr><th>#</th><th>severity</th><th>what</th>' +
          '<th>where</th><th>nodes</th><th>opened</th><th>likely cause</th></tr>' +
          list.map(row).join('') + '</table>'
        : '<p class="muted">No incident.</p>';
      setUpdated(null);
    }

    return { name: 'incidents', enter: enter, refresh: refresh };
  }

  // The audit trail is read oldest first; the view keeps a cursor and only
  // asks for entries from the newest one it holds, keeping the last
  // AUDIT_SHOWN (entries of the same millisecond are told apart by origin
  // and seq).
  function auditView() {
    let root;
    let since = 0;
    let entries = [];

    function enter(el) {
      root = el;
      root.innerHTML = '<h2>Audit trail <span class="muted">(newest first)</span></h2><div data-testid="audit"></div>';
    }

    function key(e) {
      return e.origin + '/' + e.seq;
    }

    async function refresh(isCurrent) {
      const seen = new Set(entries.map(key));
      for (;;) {
        const page = await api('/api/v1/audit?since=' + since + '&limit=' + AUDIT_PAGE);
        if (!isCurrent()) return;
        const fresh = (page.entries || []).filter(function (e) { return !seen.has(key(e)); });
        fresh.forEach(function (e) { seen.add(key(e)); });
        entries = entries.concat(fresh).slice(-AUDIT_SHOWN);
        const last = (page.entries || [])[(page.entries || []).length - 1];
        const next = last ? num(last.hlc_ms) : since;
        // A full page all in one millisecond cannot move the cursor on;
        // stop rather than ask for the same page again.
        if (!page.truncated || next === since) break;
        since = next;
      }
      if (entries.length) since = num(entries[entries.length - 1].hlc_ms);
      const shown = entries.slice().reverse();
      root.querySelector('[data-testid=audit]').innerHTML = shown.length
        ? '<table data-testid="audit-table"><tr><th>when</th><th>origin</th><th>seq</th><th>author</th><th>operation</th><th>hash</th></tr>' +
          shown.map(function (e) {
            return '<tr><td>' + esc(when(e.hlc_ms)) + '</td><td>' + esc(e.origin) + '</td><td class="num">' + esc(e.seq) + '</td><td>' +
              esc(e.author) + '</td><td>' + esc(e.op_text) + '</td><td class="mono" title="' + esc(e.hash) + '">' +
              esc(String(e.hash || '').slice(0, 12)) + '</td></tr>';
          }).join('') + '</table>'
        : '<p class="muted">The log is empty.</p>';
      setUpdated(null);
    }

    return { name: 'audit', enter: enter, refresh: refresh };
  }

  // ---- routing and polling ----------------------------------------------

  let generation = 0;
  let timer = 0;

  function route() {
    const parts = (location.hash.replace(/^#\/?/, '') || '').split('/').map(function (p) {
      try {
        return decodeURIComponent(p);
      } catch (e) {
        return p;
      }
    });
    switch (parts[0]) {
      case 'site':
        if (parts.length >= 3 && parts[1] && parts[2]) return siteView(parts[1], parts[2]);
        return overviewView();
      case 'rollouts': return rolloutsView();
      case 'incidents': return incidentsView();
      case 'audit': return auditView();
      default: return overviewView();
    }
  }

  function show() {
    generation += 1;
    const mine = generation;
    clearTimeout(timer);
    const view = route();
    const nav = view.name;
    document.querySelectorAll('header nav a').forEach(function (a) {
      a.classList.toggle('active', a.dataset.view === nav);
    });
    const root = document.getElementById('view');
    view.enter(root);
    clearApiError();
    const isCurrent = function () { return mine === generation; };
    const tick = async function () {
      try {
        await view.refresh(isCurrent);
        if (isCurrent()) clearApiError();
      } catch (e) {
        if (!isCurrent()) return;
        if (e instanceof ApiError) showApiError(e);
        else recordScriptError((e && e.stack) || e);
      }
      if (isCurrent()) timer = setTimeout(tick, POLL_MS);
    };
    tick();
  }

  window.addEventListener('hashchange', show);
  show();
})();
