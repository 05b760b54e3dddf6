// lethe's page: chat with a served model, or ask two (A/B) the same conversation and see where
// their answers part. It talks only to this server: /v1/models, /lora-adapters,
// /v1/chat/completions (streamed, with logprobs) and /score.
'use strict';

const $ = (id) => document.getElementById(id);
const KEY_STORE = 'lethe-api-key';
const TOP_LOGPROBS = 5;

const S = {
  needKey: document.body.dataset.key === 'true',
  lock: document.body.dataset.lock === 'true',
  key: sessionStorage.getItem(KEY_STORE) || '',
  models: [], // /v1/models data
  adapters: [], // /lora-adapters, when readable
  baseId: null,
  turns: [],
  ctrl: null,
  busy: false,
};

// ---------------------------------------------------------------------------------------------
// Talking to the server

class PageError extends Error {}

function headers() {
  const h = { 'Content-Type': 'application/json' };
  if (S.key) h.Authorization = 'Bearer ' + S.key;
  return h;
}

// A readable sentence for an error envelope `{error: {code, message, type}}` with `status`.
function describe(status, err) {
  const msg = (err && err.message) || '';
  const type = (err && err.type) || '';
  if (status === 401 || type === 'authentication_error') {
    return S.key
      ? 'The server refused this API key (401). Check the key field at the top.'
      : 'The server needs an API key (401): enter it in the key field at the top.';
  }
  if (type === 'exceed_context_size_error') {
    return 'The conversation does not fit the model\'s context: ' + msg +
      '. Clear the conversation or ask something shorter.';
  }
  if (status === 403 || type === 'permission_error') {
    return 'The server refused this request (403): ' + msg + '.';
  }
  if (status === 503) return 'The server is not ready (' + (msg || 'unavailable') + '); try again in a moment.';
  if (status === 404) return 'Not found (404): ' + msg + '.';
  if (msg) return 'The server answered ' + (status || 'an error') + ': ' + msg + '.';
  return 'The server answered ' + status + '.';
}

async function httpError(res) {
  let err = null;
  try {
    const j = await res.json();
    err = j && j.error;
  } catch (_) { /* not JSON */ }
  const e = new PageError(describe(res.status, err));
  e.status = res.status;
  return e;
}

function unreachable() {
  return new PageError('Cannot reach the server: is lethe serve still running?');
}

async function api(method, path, body, signal) {
  let res;
  try {
    res = await fetch(path, {
      method,
      headers: headers(),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (e) {
    if (signal && signal.aborted) throw e;
    throw unreachable();
  }
  if (!res.ok) throw await httpError(res);
  try {
    return await res.json();
  } catch (_) {
    throw new PageError('The server sent something that is not JSON for ' + path + '.');
  }
}

// Stream a chat completion; `onChunk(text, logprobs)` per event. Resolves with the finish
// reason; rejects with a PageError that says what went wrong.
async function streamChat(body, signal, onChunk) {
  let res;
  try {
    res = await fetch('/v1/chat/completions', {
      method: 'POST', headers: headers(), body: JSON.stringify(body), signal,
    });
  } catch (e) {
    if (signal.aborted) throw e;
    throw unreachable();
  }
  if (!res.ok) throw await httpError(res);
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  let finish = null;
  let done = false;
  while (!done) {
    let r;
    try {
      r = await reader.read();
    } catch (e) {
      if (signal.aborted) throw e;
      throw new PageError('The connection broke before the answer was finished ' +
        '(the server may have stopped).');
    }
    if (r.done) break;
    buf += dec.decode(r.value, { stream: true });
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of event.split('\n')) {
        if (!line.startsWith('data: ')) continue;
        const data = line.slice(6);
        if (data === '[DONE]') {
          done = true;
          continue;
        }
        let j;
        try {
          j = JSON.parse(data);
        } catch (_) {
          throw new PageError('The server sent an event that is not JSON.');
        }
        if (j.error) throw new PageError(describe(j.error.code, j.error));
        const c = j.choices && j.choices[0];
        if (!c) continue;
        const text = (c.delta && c.delta.content) || '';
        const lps = (c.logprobs && c.logprobs.content) || [];
        if (text || lps.length) onChunk(text, lps);
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
  }
  if (!done) {
    throw new PageError('The server closed the stream before the answer was finished ' +
      '(it may have stopped).');
  }
  return finish;
}

// ---------------------------------------------------------------------------------------------
// Models, keys and settings

function meta(id) {
  const m = S.models.find((x) => x.id === id);
  return m && m.meta ? m.meta : {};
}

function audit(id) {
  return meta(id).unlearn || null;
}

function showError(msg) {
  const e = $('error');
  e.textContent = msg;
  e.hidden = !msg;
}

async function loadServer() {
  $('key-box').hidden = !S.needKey;
  $('api-key').value = S.key;
  $('lock-note').hidden = !S.lock;
  try {
    const list = await api('GET', '/v1/models');
    S.models = (list && list.data) || [];
  } catch (e) {
    $('server-status').textContent = 'not connected';
    showError(e.message);
    return;
  }
  S.adapters = [];
  if (!S.lock && (!S.needKey || S.key)) {
    try {
      S.adapters = await api('GET', '/lora-adapters');
    } catch (e) {
      if (e.status === 401) {
        $('key-status').textContent = 'key refused';
        showError(e.message);
      }
    }
  }
  const base = S.models.find((m) => m.meta && m.meta.profile === null);
  S.baseId = base ? base.id : null;
  fillPickers();
  const n = S.models.length;
  $('server-status').textContent = n + (n === 1 ? ' model' : ' models') +
    (S.lock ? ', locked' : '') + (S.needKey ? ', key required' : '');
  if (S.needKey && !S.key) {
    $('key-status').textContent = 'enter the server\'s key to chat';
  }
}

function fillPickers() {
  const ids = S.models.map((m) => m.id);
  const prevA = $('model-a').value;
  const prevB = $('model-b').value;
  for (const sel of [$('model-a'), $('model-b')]) {
    sel.replaceChildren(...ids.map((id) => {
      const o = document.createElement('option');
      o.value = id;
      const p = meta(id).profile;
      o.textContent = id + (p === null ? ' (base)' : p ? ' (profile)' : '');
      return o;
    }));
  }
  // Default: the base on A and the first profile on B.
  const profiles = S.models.filter((m) => m.meta && m.meta.profile);
  const a = ids.includes(prevA) ? prevA : (S.baseId || ids[0]);
  const bDefault = (profiles.find((m) => m.id !== a) || S.models.find((m) => m.id !== a) || {}).id;
  const b = ids.includes(prevB) && prevB !== a ? prevB : bDefault;
  if (a) $('model-a').value = a;
  if (b) $('model-b').value = b;
  const ab = document.querySelector('input[name=mode][value=ab]');
  ab.disabled = ids.length < 2;
  if (ids.length < 2) document.querySelector('input[name=mode][value=chat]').checked = true;
  modeChanged();
}

function abMode() {
  return document.querySelector('input[name=mode]:checked').value === 'ab';
}

function modeChanged() {
  $('pick-b').hidden = !abMode();
  renderOverrides();
  renderAudit();
}

function sideModels() {
  return abMode() ? [$('model-a').value, $('model-b').value] : [$('model-a').value];
}

// The patches a model runs, from /lora-adapters: its own, and the base's (--lora on the
// command line applies to every model).
function patchesOf(id) {
  return S.adapters.filter((p) => p.model === id || (S.baseId && p.model === S.baseId));
}

function renderOverrides() {
  const box = $('overrides');
  box.replaceChildren();
  if (S.lock) return;
  sideModels().forEach((id, k) => {
    const patches = patchesOf(id);
    const au = audit(id);
    const assistants = (au && au.assistants) || [];
    if (!patches.length && !assistants.length) return;
    const div = document.createElement('div');
    div.className = 'override';
    div.dataset.side = k ? 'b' : 'a';
    const h = document.createElement('h3');
    h.textContent = 'Overrides for ' + (k ? 'B' : 'A') + ' (' + id + ')';
    div.append(h);
    const grid = document.createElement('div');
    grid.className = 'grid';
    if (assistants.length) {
      const t = assistants[0];
      grid.append(
        field('alpha', 'ULD alpha (default ' + num(t.alpha) + ')', k, '0', '0.05'),
        field('filter', 'ULD filter (default ' + num(t.filter) + ')', k, '0', '0.01'),
      );
    }
    for (const p of patches) {
      const f = field('scale', 'Scale of ' + p.path + ' (default ' + num(p.scale) + ')', k, null, '0.1');
      const input = f.querySelector('input');
      input.dataset.adapter = p.id;
      input.value = p.scale;
      input.dataset.default = p.scale;
      grid.append(f);
    }
    div.append(grid);
    box.append(div);
  });
}

function num(x) {
  return typeof x === 'number' ? String(Math.round(x * 1e4) / 1e4) : '?';
}

function field(kind, text, k, min, step) {
  const label = document.createElement('label');
  const input = document.createElement('input');
  input.type = 'number';
  input.step = step;
  if (min !== null) input.min = min;
  input.dataset.kind = kind;
  input.dataset.side = String(k);
  input.className = 'ov';
  label.append(text, input);
  return label;
}

// A side's `lora` and `unlearn` fields, from the override inputs; empty where nothing changed.
function overridesFor(k) {
  const out = {};
  if (S.lock) return out;
  const inputs = [...document.querySelectorAll('#overrides input.ov[data-side="' + k + '"]')];
  const scales = inputs.filter((i) => i.dataset.kind === 'scale');
  if (scales.some((i) => i.value !== '' && Number(i.value) !== Number(i.dataset.default))) {
    out.lora = scales.map((i) => ({
      id: Number(i.dataset.adapter),
      scale: i.value === '' ? Number(i.dataset.default) : Number(i.value),
    }));
  }
  const unlearn = {};
  for (const i of inputs) {
    if ((i.dataset.kind === 'alpha' || i.dataset.kind === 'filter') && i.value !== '') {
      unlearn[i.dataset.kind] = Number(i.value);
    }
  }
  if (Object.keys(unlearn).length) out.unlearn = unlearn;
  return out;
}

function renderAudit() {
  const box = $('audit-body');
  box.replaceChildren();
  sideModels().forEach((id, k) => {
    const div = document.createElement('div');
    div.className = 'audit-side';
    const h = document.createElement('h3');
    h.textContent = (k ? 'B' : 'A') + ': ' + id;
    div.append(h);
    const au = audit(id);
    if (!au) {
      div.append(para(S.needKey || S.lock
        ? 'What this model is made of is shown only with the server\'s API key.'
        : 'The server does not say what this model is made of.'));
    } else {
      const rows = [];
      rows.push(['profile', au.profile === null ? '(none: the base model)' : String(au.profile)]);
      for (const p of au.patches || []) rows.push(['patch', p.file + ' (scale ' + num(p.scale) + ')']);
      for (const a of au.assistants || []) {
        rows.push(['assistant', a.kind + ', alpha ' + num(a.alpha) + ', filter ' + num(a.filter)]);
      }
      for (const f of au.files || []) rows.push([f.role, f.path, f.sha256]);
      if (!(au.files || []).length) rows.push(['files', 'the base model\'s file only (no patch or assistant)']);
      const t = document.createElement('table');
      for (const r of rows) {
        const tr = document.createElement('tr');
        r.forEach((c, i) => {
          const td = document.createElement(i ? 'td' : 'th');
          td.textContent = c;
          if (i === 2) td.className = 'hash';
          tr.append(td);
        });
        t.append(tr);
      }
      div.append(t);
    }
    box.append(div);
  });
}

function para(text, cls) {
  const p = document.createElement('p');
  p.className = cls || 'note';
  p.textContent = text;
  return p;
}

function settings() {
  const stop = $('stop').value.split('\n').filter((s) => s !== '').map((s) => s.replace(/\\n/g, '\n'));
  return {
    system: $('system').value,
    temperature: Number($('temperature').value || 0),
    max_tokens: Math.max(1, Math.floor(Number($('max-tokens').value || 128))),
    seed: Math.floor(Number($('seed').value || 0)),
    stop,
  };
}

// ---------------------------------------------------------------------------------------------
// A conversation: turns, each with one answer per side

// What side `k` has seen: the system prompt, then each earlier turn it answered (a turn it
// failed or never had is left out, so that asking again does not repeat the question).
function history(k) {
  const msgs = [];
  const sys = $('system').value;
  if (sys) msgs.push({ role: 'system', content: sys });
  for (const t of S.turns) {
    const side = t.sides[k];
    if (!side || !(side.state === 'done' || (side.state === 'stopped' && side.text))) continue;
    msgs.push({ role: 'user', content: t.user });
    msgs.push({ role: 'assistant', content: side.text });
  }
  return msgs;
}

function newSide(model, k, messages) {
  return {
    model, k, messages,
    text: '', tokens: [], spans: [], pending: [],
    decoder: new TextDecoder(),
    finish: null, error: null, state: 'waiting',
    overrides: overridesFor(k),
    audit: audit(model),
    gap: null,
  };
}

function renderTurn(turn) {
  const art = document.createElement('article');
  art.className = 'turn';
  const user = document.createElement('div');
  user.className = 'user';
  const who = document.createElement('span');
  who.className = 'who';
  who.textContent = 'You';
  user.append(who, turn.user);
  const answers = document.createElement('div');
  answers.className = 'answers' + (turn.sides.length === 2 ? ' two' : '');
  for (const side of turn.sides) {
    const sec = document.createElement('section');
    sec.className = 'side';
    sec.dataset.side = side.k ? 'b' : 'a';
    sec.dataset.state = 'waiting';
    const head = document.createElement('header');
    const badge = document.createElement('span');
    badge.className = 'badge ' + (side.k ? 'b' : 'a');
    badge.textContent = side.k ? 'B' : 'A';
    const model = document.createElement('span');
    model.className = 'model';
    model.textContent = side.model;
    const status = document.createElement('span');
    status.className = 'status';
    status.setAttribute('role', 'status');
    status.textContent = 'waiting…';
    head.append(badge, model, status);
    const answer = document.createElement('div');
    answer.className = 'answer';
    answer.tabIndex = 0;
    answer.setAttribute('aria-label', 'Answer of ' + side.model +
      ' (arrow keys: token probabilities)');
    const strip = document.createElement('div');
    strip.className = 'strip';
    const info = document.createElement('p');
    info.className = 'info';
    const err = document.createElement('p');
    err.className = 'side-error';
    err.setAttribute('role', 'alert');
    err.hidden = true;
    sec.append(head, answer, strip, info, err);
    answers.append(sec);
    side.el = { sec, status, answer, strip, info, err };
    answer.addEventListener('keydown', (ev) => tokenKeys(ev, side));
    answer.addEventListener('blur', () => {
      hideTip();
      if (side.cursor !== undefined) side.spans[side.cursor].el.classList.remove('cursor');
      side.cursor = undefined;
    });
    strip.addEventListener('click', (ev) => stripClick(ev, side));
    strip.addEventListener('mouseover', (ev) => stripHover(ev, side));
    strip.addEventListener('mouseout', hideTip);
  }
  art.append(user, answers);
  turn.el = art;
  $('conversation').append(art);
  art.scrollIntoView({ block: 'end' });
}

function setState(side, state, text) {
  side.state = state;
  side.el.sec.dataset.state = state;
  side.el.status.textContent = text;
}

// One streamed event: its text and its tokens. A token is its own span when the tokens'
// bytes decode to exactly the event's text; otherwise (a stop string held text back, say)
// the event's text is one span for all its tokens. The spans always add up to the text.
function addChunk(side, text, lps) {
  const first = side.tokens.length;
  for (const lp of lps) side.tokens.push(lp);
  const idx = lps.map((_, i) => first + i);
  const pieces = lps.map((lp) => side.decoder.decode(new Uint8Array(lp.bytes || []), { stream: true }));
  if (lps.length && pieces.join('') === text) {
    pieces.forEach((p, i) => {
      side.pending.push(idx[i]);
      if (p !== '') {
        pushSpan(side, p, side.pending);
        side.pending = [];
      }
    });
  } else {
    side.decoder = new TextDecoder();
    side.pending.push(...idx);
    if (text !== '') {
      pushSpan(side, text, side.pending);
      side.pending = [];
    }
  }
  side.text += text;
}

function pushSpan(side, text, toks) {
  const i = side.spans.length;
  const span = document.createElement('span');
  span.className = 'tok';
  span.dataset.i = String(i);
  span.textContent = text;
  side.spans.push({ text, toks: toks.slice(), el: span });
  side.el.answer.append(span);
  span.addEventListener('mouseover', () => showTip(span, side, i));
  span.addEventListener('mouseout', hideTip);
}

async function runSide(side, s, signal) {
  const body = {
    model: side.model,
    messages: side.messages,
    stream: true,
    logprobs: true,
    top_logprobs: TOP_LOGPROBS,
    temperature: s.temperature,
    max_tokens: s.max_tokens,
    seed: s.seed,
  };
  if (s.stop.length) body.stop = s.stop;
  Object.assign(body, side.overrides);
  setState(side, 'streaming', 'waiting for the server…');
  try {
    side.finish = await streamChat(body, signal, (text, lps) => {
      if (!side.text && !side.tokens.length) side.el.status.textContent = 'streaming…';
      addChunk(side, text, lps);
    });
    if (side.pending.length && side.spans.length) {
      side.spans[side.spans.length - 1].toks.push(...side.pending);
      side.pending = [];
    }
    const n = side.tokens.length;
    setState(side, 'done', n + (n === 1 ? ' token' : ' tokens') +
      (side.finish === 'length' ? ' (max tokens reached)' : ''));
  } catch (e) {
    if (signal.aborted) {
      setState(side, 'stopped', 'stopped');
      return;
    }
    side.error = e.message || String(e);
    setState(side, 'error', 'failed');
    side.el.err.textContent = side.error;
    side.el.err.hidden = false;
    if (e.status === 401) $('api-key').focus();
  }
}

// Where two answers part: the first token whose id differs (`null`: identical), and the
// first character (code point) where the texts differ.
function firstDiff(a, b) {
  const n = Math.min(a.tokens.length, b.tokens.length);
  let tok = null;
  for (let i = 0; i < n; i++) {
    if (a.tokens[i].id !== b.tokens[i].id) {
      tok = i;
      break;
    }
  }
  if (tok === null && a.tokens.length !== b.tokens.length) tok = n;
  const ca = Array.from(a.text);
  const cb = Array.from(b.text);
  let ch = null;
  const m = Math.min(ca.length, cb.length);
  for (let i = 0; i < m; i++) {
    if (ca[i] !== cb[i]) {
      ch = i;
      break;
    }
  }
  if (ch === null && ca.length !== cb.length) ch = m;
  return { tok, ch };
}

// Mark a span as the first difference: its text after any leading white space is
// highlighted (the span's text stays as it was).
function markSpan(span) {
  span.el.classList.add('diff');
  const lead = span.text.match(/^\s*/)[0];
  if (!lead || lead === span.text) return;
  const mark = document.createElement('mark');
  mark.textContent = span.text.slice(lead.length);
  span.el.replaceChildren(lead, mark);
}

function markDiff(turn) {
  const [a, b] = turn.sides;
  const d = firstDiff(a, b);
  turn.diff = d;
  if (d.tok === null) {
    for (const s of [a, b]) s.el.info.textContent = 'The two answers are identical.';
    return;
  }
  for (const s of [a, b]) {
    const span = s.spans.find((sp) => sp.toks.includes(d.tok));
    if (span) markSpan(span);
    s.el.info.textContent = 'First difference at token ' + (d.tok + 1) +
      (span ? ' (marked)' : ' (this answer ends there)') + '.';
  }
}

// ---------------------------------------------------------------------------------------------
// Where the two models disagree: each answer scored by both (POST /score), per token
// log p(this side) - log p(other side), in nats.

async function scoreTurn(turn) {
  const [a, b] = turn.sides;
  const signal = S.ctrl ? S.ctrl.signal : undefined;
  const jobs = [];
  for (const [own, other] of [[a, b], [b, a]]) {
    if (!own.text) continue;
    const score = (side) => {
      const body = { model: side.model, messages: own.messages, continuation: [own.text] };
      Object.assign(body, side.overrides);
      return api('POST', '/score', body, signal);
    };
    jobs.push(Promise.all([score(own), score(other)]).then(([x, y]) => {
      const tx = x.results[0].tokens;
      const ty = y.results[0].tokens;
      const toks = tx.map((t, i) => ({
        token: t.token,
        own: t.logprob,
        other: ty[i] ? ty[i].logprob : null,
        gap: ty[i] ? t.logprob - ty[i].logprob : null,
      }));
      own.gap = toks;
      drawStrip(own, other);
    }).catch((e) => {
      if (!(signal && signal.aborted)) {
        own.el.info.textContent += ' Disagreement not scored: ' + e.message;
      }
    }));
  }
  await Promise.all(jobs);
  turn.el.dataset.scored = 'true';
}

function drawStrip(side, other) {
  const strip = side.el.strip;
  strip.replaceChildren();
  const gaps = side.gap.map((t) => t.gap).filter((g) => g !== null);
  if (!gaps.length) return;
  let offset = 0;
  side.gap.forEach((t, i) => {
    const seg = document.createElement('span');
    seg.className = 'seg';
    seg.dataset.i = String(i);
    seg.dataset.offset = String(offset);
    offset += t.token.length;
    const g = t.gap === null ? 0 : t.gap;
    const alpha = Math.min(1, Math.abs(g) / 4);
    seg.style.background = g >= 0
      ? 'rgba(214, 69, 30, ' + alpha.toFixed(3) + ')'
      : 'rgba(47, 111, 208, ' + alpha.toFixed(3) + ')';
    strip.append(seg);
  });
  strip.title = 'Per token: log p under ' + side.model + ' minus log p under ' + other.model +
    ' (red: ' + other.model + ' finds it less likely; blue: more likely)';
  const mean = gaps.reduce((s, g) => s + g, 0) / gaps.length;
  let peak = 0;
  side.gap.forEach((t, i) => {
    if (t.gap !== null && Math.abs(t.gap) > Math.abs(side.gap[peak].gap || 0)) peak = i;
  });
  side.gapMean = mean;
  const p = side.gap[peak];
  side.el.info.textContent += ' Against ' + other.model + ': mean log-probability gap ' +
    mean.toFixed(3) + ' nats/token; largest ' + (p.gap || 0).toFixed(3) + ' at ' +
    JSON.stringify(p.token) + '.';
}

function segAt(ev) {
  const seg = ev.target.closest('.seg');
  return seg ? Number(seg.dataset.i) : null;
}

function spanAtOffset(side, offset) {
  let pos = 0;
  for (const sp of side.spans) {
    if (offset < pos + sp.text.length) return sp;
    pos += sp.text.length;
  }
  return side.spans[side.spans.length - 1] || null;
}

function stripClick(ev, side) {
  const i = segAt(ev);
  if (i === null) return;
  const seg = ev.target.closest('.seg');
  const sp = spanAtOffset(side, Number(seg.dataset.offset));
  if (!sp) return;
  sp.el.classList.add('hl');
  sp.el.scrollIntoView({ block: 'nearest' });
  setTimeout(() => sp.el.classList.remove('hl'), 1500);
}

function stripHover(ev, side) {
  const i = segAt(ev);
  if (i === null || !side.gap) return;
  const t = side.gap[i];
  const lines = [JSON.stringify(t.token), 'log p here: ' + fixed(t.own)];
  if (t.other !== null) {
    lines.push('log p under the other side: ' + fixed(t.other));
    lines.push('gap: ' + fixed(t.gap) + ' nats');
  }
  placeTip(ev.target.closest('.seg'), lines.join('\n'));
}

// ---------------------------------------------------------------------------------------------
// Token probabilities: on hover, or with the arrow keys in a focused answer

function prob(logprob) {
  if (typeof logprob !== 'number') return '?';
  const p = Math.exp(logprob);
  return p >= 0.001 ? p.toFixed(4) : p.toExponential(2);
}

function fixed(x) {
  return typeof x === 'number' ? x.toFixed(3) : '?';
}

function tipText(side, i) {
  const sp = side.spans[i];
  const lines = [];
  for (const t of sp.toks) {
    const lp = side.tokens[t];
    lines.push('token ' + (t + 1) + ' ' + JSON.stringify(lp.token) + ': p = ' + prob(lp.logprob) +
      ' (log p ' + fixed(lp.logprob) + ')');
    const alts = (lp.top_logprobs || []).filter((a) => a.id !== lp.id).slice(0, 4);
    for (const a of alts) lines.push('  ' + JSON.stringify(a.token) + ': ' + prob(a.logprob));
  }
  return lines.join('\n');
}

function placeTip(target, text) {
  const tip = $('tip');
  tip.textContent = text;
  tip.hidden = false;
  const r = target.getBoundingClientRect();
  const w = tip.offsetWidth;
  const h = tip.offsetHeight;
  const left = Math.max(4, Math.min(window.innerWidth - w - 4, r.left));
  const below = r.bottom + 6;
  tip.style.left = left + 'px';
  tip.style.top = (below + h > window.innerHeight ? Math.max(4, r.top - h - 6) : below) + 'px';
}

function showTip(span, side, i) {
  placeTip(span, tipText(side, i));
}

function hideTip() {
  $('tip').hidden = true;
}

function tokenKeys(ev, side) {
  if (!side.spans.length) return;
  const cur = side.cursor === undefined ? -1 : side.cursor;
  let next = cur;
  if (ev.key === 'ArrowRight') next = Math.min(side.spans.length - 1, cur + 1);
  else if (ev.key === 'ArrowLeft') next = Math.max(0, cur - 1);
  else if (ev.key === 'Home') next = 0;
  else if (ev.key === 'End') next = side.spans.length - 1;
  else if (ev.key === 'Escape') {
    hideTip();
    return;
  } else return;
  ev.preventDefault();
  if (cur >= 0) side.spans[cur].el.classList.remove('cursor');
  side.cursor = next;
  const sp = side.spans[next];
  sp.el.classList.add('cursor');
  showTip(sp.el, side, next);
}

// ---------------------------------------------------------------------------------------------
// Sending, stopping, clearing, exporting

function setBusy(b) {
  S.busy = b;
  $('send').disabled = b;
  $('stop-btn').disabled = !b;
  $('clear').disabled = b;
  for (const id of ['model-a', 'model-b']) $(id).disabled = b;
}

async function send() {
  const text = $('prompt').value.trim();
  if (!text || S.busy) return;
  showError('');
  const models = sideModels();
  if (!models[0] || (models.length === 2 && !models[1])) {
    showError('No model to ask: the server lists none.');
    return;
  }
  const s = settings();
  const sides = models.map((m, k) => newSide(m, k, history(k).concat([{ role: 'user', content: text }])));
  const turn = { user: text, sides, settings: s, diff: null };
  S.turns.push(turn);
  renderTurn(turn);
  $('prompt').value = '';
  setBusy(true);
  S.ctrl = new AbortController();
  try {
    await Promise.all(sides.map((side) => runSide(side, s, S.ctrl.signal)));
    if (sides.length === 2 && sides.every((x) => x.state === 'done')) markDiff(turn);
    turn.el.dataset.state = 'done';
    if (sides.length === 2 && sides.every((x) => x.state === 'done')) await scoreTurn(turn);
  } catch (e) {
    showError('Something went wrong in the page: ' + (e.message || e));
  } finally {
    turn.el.dataset.state = 'done';
    setBusy(false);
    $('prompt').focus();
  }
}

function stop() {
  if (S.ctrl) S.ctrl.abort();
}

function clearAll() {
  if (S.busy) return;
  S.turns = [];
  $('conversation').replaceChildren();
  showError('');
  hideTip();
}

// The conversation in the shape `lethe compare --json` writes ({a, b, max_tokens, pairs}),
// one pair per turn. `kl` and `mean_kl` are null: KL needs both whole distributions, which the
// HTTP API does not return; `gap_a`/`gap_b` are the per-token log-probability gaps instead.
function exportData() {
  const first = S.turns[0];
  const side = (k) => {
    const s = first && first.sides[k];
    return s ? { name: s.model, audit: s.audit } : null;
  };
  const gaps = (s) => (s && s.gap ? s.gap.map((t) => t.gap) : null);
  const mean = (xs) => (xs && xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null);
  return {
    a: side(0),
    b: side(1),
    max_tokens: first ? first.settings.max_tokens : settings().max_tokens,
    pairs: S.turns.map((t) => {
      const [a, b] = t.sides;
      return {
        prompt: t.user,
        reference: null,
        a: a.text,
        b: b ? b.text : null,
        first_diff_token: t.diff ? t.diff.tok : null,
        first_diff_char: t.diff ? t.diff.ch : null,
        mean_kl: null,
        kl: null,
        a_tokens: a.tokens.length,
        b_tokens: b ? b.tokens.length : null,
        gap_a: gaps(a),
        gap_b: gaps(b),
        mean_gap_a: mean(gaps(a)),
        mean_gap_b: mean(gaps(b)),
        a_model: a.model,
        b_model: b ? b.model : null,
        messages_a: a.messages,
        messages_b: b ? b.messages : null,
        settings: Object.assign({}, t.settings, {
          overrides_a: a.overrides, overrides_b: b ? b.overrides : null,
        }),
        errors: [a.error, b ? b.error : null],
      };
    }),
  };
}

function exportJson() {
  if (!S.turns.length) {
    showError('Nothing to export yet: ask a question first.');
    return;
  }
  const blob = new Blob([JSON.stringify(exportData(), null, 2) + '\n'], { type: 'application/json' });
  const url = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = url;
  a.download = 'lethe-compare.json';
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function useKey(ev) {
  ev.preventDefault();
  S.key = $('api-key').value.trim();
  if (S.key) sessionStorage.setItem(KEY_STORE, S.key);
  else sessionStorage.removeItem(KEY_STORE);
  $('key-status').textContent = 'checking…';
  showError('');
  try {
    // A route behind the key answers 200 only with a good one.
    await api('GET', '/lora-adapters');
    $('key-status').textContent = 'key accepted';
  } catch (e) {
    $('key-status').textContent = e.status === 401 ? 'key refused' : 'could not check';
    showError(e.message);
    return;
  }
  await loadServer();
  $('key-status').textContent = 'key accepted';
}

function init() {
  $('composer').addEventListener('submit', (ev) => {
    ev.preventDefault();
    send();
  });
  $('prompt').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send();
    }
  });
  document.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape' && S.busy) stop();
  });
  $('stop-btn').addEventListener('click', stop);
  $('clear').addEventListener('click', clearAll);
  $('export').addEventListener('click', exportJson);
  $('key-box').addEventListener('submit', useKey);
  for (const r of document.querySelectorAll('input[name=mode]')) r.addEventListener('change', modeChanged);
  $('model-a').addEventListener('change', modeChanged);
  $('model-b').addEventListener('change', modeChanged);
  window.addEventListener('scroll', hideTip, { passive: true });
  window.lethe = { exportData };
  loadServer();
}

init();
