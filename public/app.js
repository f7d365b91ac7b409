// Compare quotes live: the reference front end of the quote-run API (its contract: API.md, README).
//
// 1. POST /api/quotes with the form's request; a problem response is shown where it belongs.
// 2. Follow the run's event stream with EventSource. The browser reconnects by itself when a
//    stream ends (sending Last-Event-ID); a refused stream is reopened here after a pause, with
//    ?lastEventId= of the last event applied. Events are applied exactly once, in id order.
// 3. The run id goes into this page's URL (?run=…): opening it replays the run's stream from its
//    first event into fresh state, so a reload resumes the run and a link shows its result.
//
// ?api=https://other.host makes the page call that origin instead of its own (the API has CORS).

const PROVIDER_NAMES = {
  geico: "GEICO",
  progressive: "Progressive",
  state_farm: "State Farm",
  allstate: "Allstate",
  liberty_mutual: "Liberty Mutual",
};

// provider_error codes (and a failed run's code, for the insurers it left unfinished), in plain words.
const PROVIDER_PROBLEMS = {
  provider_timeout: (name) => `${name} took too long to answer.`,
  provider_blocked: (name) => `${name}'s website turned the quoting agent away.`,
  provider_declined: (name) => `${name} does not offer a quote for this driver or car.`,
  provider_bad_output: (name) => `The agent could not read a price from ${name}'s website.`,
  provider_unavailable: (name) => `The quoting service could not reach ${name} this time.`,
  provider_auth: () => "The quoting service refused this site's account (key or credit).",
  worker_lost: () => "The run stopped before this insurer answered.",
  deadline_exceeded: (name) => `The run ran out of time before ${name} answered.`,
  internal: () => "Something went wrong on our side before this insurer answered.",
};

const RUN_PROBLEMS = {
  worker_lost: "The run stopped unexpectedly and nothing could resume it. Start it again.",
  deadline_exceeded: "The run ran out of time; insurers that had not answered are marked below.",
  internal: "Something went wrong on our side. Start the run again.",
};

const STATUS_LABELS = { pending: "Waiting", running: "Working", quoted: "Quoted", failed: "No quote" };
const TERMINAL_EVENTS = new Set(["complete", "error"]);
const API_KEY_STORAGE = "quotes:apiKey";
const MAX_REOPEN_PAUSE_SECONDS = 30;

const TITLE = document.title;

const $ = (id) => document.getElementById(id);
const api = apiOrigin(new URLSearchParams(location.search).get("api"));
let run = null; // the run on screen (see newRun)
let lastAttempt = null; // {body, key} of a POST that got no response, so a retry reuses its key

// ---------------------------------------------------------------------------------- settings

function apiOrigin(given) {
  if (!given) return location.origin;
  try {
    const url = new URL(given);
    if (url.protocol === "http:" || url.protocol === "https:") return url.origin;
  } catch {
    // fall through: shown on the form below
  }
  queueMicrotask(() =>
    showNotice($("form-problem"), `The address given as ?api= (${given}) is not an http(s) URL; this page's own origin is used.`),
  );
  return location.origin;
}

function apiUrl(path) {
  return new URL(path, api).href;
}

function pageUrl(runId) {
  const url = new URL(location.href);
  if (runId) url.searchParams.set("run", runId);
  else url.searchParams.delete("run");
  return url.href;
}

// ---------------------------------------------------------------------------------- the form

function readRequest() {
  const form = $("quote-form");
  const value = (name) => form.elements[name].value.trim();
  // "12,000" means 12000; anything else that is not a number goes as typed, for the API to name.
  const mileage = value("annualMileage").replace(/[,\s]/g, "");
  const miles = mileage === "" ? null : Number.isFinite(Number(mileage)) ? Number(mileage) : mileage;
  return {
    vin: value("vin"),
    zip: value("zip"),
    driver: { firstName: value("firstName"), lastName: value("lastName"), dateOfBirth: value("dateOfBirth") },
    vehicle: { annualMileage: miles, use: value("use"), ownership: value("ownership") },
    coverage: form.querySelector("input[name=coverage]:checked")?.value ?? null,
    providers: [...form.querySelectorAll("input[name=providers]:checked")].map((box) => box.value),
  };
}

function idempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function startRun(event) {
  event.preventDefault();
  clearProblems();
  const request = readRequest();
  const body = JSON.stringify(request);
  // The same request retried after a lost response is the same run: reuse its Idempotency-Key.
  const key = lastAttempt?.body === body ? lastAttempt.key : idempotencyKey();
  const headers = { "Content-Type": "application/json", "Idempotency-Key": key };
  const apiKey = $("apiKey").value.trim();
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;

  const button = $("submit");
  button.disabled = true;
  button.textContent = "Starting…";
  try {
    let response;
    try {
      response = await fetch(apiUrl("/api/quotes"), { method: "POST", headers, body });
    } catch {
      lastAttempt = { body, key };
      showFormProblem(`Could not reach the quote service at ${api}. Check your connection and try again.`);
      return;
    }
    lastAttempt = null;
    if (response.status === 202 || response.status === 200) {
      const started = await response.json();
      history.pushState({ run: started.runId }, "", pageUrl(started.runId));
      showRun(newRun(started.runId, started.statusUrl, started.streamUrl));
      announce("Run started: asking the insurers.");
    } else {
      await showProblem(response, request);
    }
  } finally {
    button.disabled = false;
    button.textContent = "Compare quotes";
  }
}

// RFC 9457 problems: each errors[].field at its input; 401, 429 and 503 say what to do next.
async function showProblem(response, request) {
  let problem = {};
  try {
    problem = await response.json();
  } catch {
    // not a problem body (a proxy's error page, say): the status says enough
  }
  const detail = problem.detail ? ` ${problem.detail}` : "";
  const wait = retryAfterText(response.headers.get("Retry-After"));
  switch (response.status) {
    case 401:
      $("api-access").open = true;
      showFieldErrors([{ field: "apiKey", message: $("apiKey").value ? "This key was refused." : "Enter your API key." }], request);
      showFormProblem(
        "This service needs an API key to start a run. Enter it under “API access” and press Compare quotes again.",
      );
      $("apiKey").focus();
      return;
    case 422:
      if (Array.isArray(problem.errors) && problem.errors.length) {
        showFieldErrors(problem.errors, request);
        return;
      }
      break;
    case 429:
      showFormProblem(`Too many runs have been started from here.${detail} ${wait ? `Try again ${wait}.` : "Try again in a minute."}`);
      return;
    case 503:
      showFormProblem(`The quote service is unavailable right now.${detail} ${wait ? `Try again ${wait}.` : "Try again later."}`);
      return;
  }
  showFormProblem(`${problem.title || "The request failed"} (HTTP ${response.status}).${detail}`);
}

function retryAfterText(header) {
  if (!header) return "";
  const seconds = /^\d+$/.test(header.trim()) ? Number(header) : (Date.parse(header) - Date.now()) / 1000;
  if (!Number.isFinite(seconds)) return "";
  const at = new Date(Date.now() + Math.max(0, seconds) * 1000).toLocaleTimeString();
  const rounded = Math.max(1, Math.ceil(seconds));
  return `in ${rounded} second${rounded === 1 ? "" : "s"} (at ${at})`;
}

function showFieldErrors(errors, request) {
  const summary = document.createElement("ul");
  for (const { field, message } of errors) {
    const { container, target, label, shared } = locateField(String(field), request);
    if (container) {
      const slot = container.querySelector(".field-error");
      slot.hidden = false;
      // One slot serves all the insurers' boxes: say which one each message is about.
      slot.append(...(slot.childNodes.length ? [document.createElement("br")] : []), shared ? `${label}: ${message}` : message);
      (target ?? container).setAttribute("aria-invalid", "true");
      container.classList.add("has-error");
    }
    const item = document.createElement("li");
    const link = document.createElement(target?.id ? "a" : "span");
    if (target?.id) link.href = `#${target.id}`;
    link.textContent = `${label}: ${message}`;
    item.append(link);
    summary.append(item);
  }
  const box = $("form-problem");
  box.replaceChildren(Object.assign(document.createElement("p"), { textContent: "Please check these details:" }), summary);
  box.hidden = false;
  box.focus();
}

// Where an API field name ("vin", "driver.dateOfBirth", "providers.2") lives on this form.
function locateField(field, request) {
  const entry = /^providers\.(\d+)$/.exec(field);
  if (entry) {
    const sent = request.providers[Number(entry[1])];
    const container = document.querySelector('[data-field="providers"]');
    const target = [...container.querySelectorAll("input[name=providers]")].find((box) => box.value === sent);
    const label = target?.closest("label").textContent.trim() ?? PROVIDER_NAMES[sent] ?? `Insurer ${sent}`;
    return { container, target, label, shared: true };
  }
  for (let name = field; name; name = name.includes(".") ? name.slice(0, name.lastIndexOf(".")) : "") {
    const container = document.querySelector(`.field[data-field="${CSS.escape(name)}"]`);
    if (container) {
      const target = container.querySelector("input, select");
      const label = container.querySelector("label, legend").textContent.trim();
      return { container, target, label };
    }
  }
  return { container: null, target: null, label: field || "Request" };
}

function clearProblems() {
  for (const slot of document.querySelectorAll(".field-error")) {
    slot.hidden = true;
    slot.replaceChildren();
  }
  for (const invalid of document.querySelectorAll("[aria-invalid]")) invalid.removeAttribute("aria-invalid");
  for (const container of document.querySelectorAll(".has-error")) container.classList.remove("has-error");
  $("form-problem").hidden = true;
}

function showFormProblem(text) {
  showNotice($("form-problem"), text);
  $("form-problem").focus();
}

function showNotice(box, text) {
  box.replaceChildren(Object.assign(document.createElement("p"), { textContent: text }));
  box.hidden = false;
}

// ---------------------------------------------------------------------------------- the run

function newRun(id, statusUrl, streamUrl) {
  return {
    id,
    statusUrl,
    streamUrl,
    lastId: null, // id of the last event applied; null before the first
    finished: false,
    source: null,
    reopenTimer: 0,
    reopens: 0,
    total: 0,
    progress: { completed: 0, total: 0, percent: 0 },
    cards: new Map(), // provider id → {provider, status, activity: [], quote, error, element}
    ranking: null, // the complete event's quotes, cheapest first
    best: null,
    failure: null, // {code, message} of a failed run
  };
}

function showRun(next) {
  stopFollowing();
  run = next;
  $("run").hidden = false;
  $("run-id").textContent = run.id;
  $("run-link").href = pageUrl(run.id);
  $("cards").replaceChildren();
  $("ranking").replaceChildren();
  for (const id of ["simulated-banner", "connection-notice", "run-problem"]) $(id).hidden = true;
  render();
  follow(run);
  // On a phone the run is below the form: bring its heading to the top, and focus there.
  $("run-heading").scrollIntoView({ block: "start" });
  $("run-heading").focus({ preventScroll: true });
}

function stopFollowing() {
  if (!run) return;
  run.source?.close();
  clearTimeout(run.reopenTimer);
  run.finished = true;
}

async function resumeRun(runId) {
  const statusUrl = `/api/quotes/${encodeURIComponent(runId)}`;
  let snapshot = null;
  try {
    const response = await fetch(apiUrl(statusUrl), { cache: "no-store" });
    if (response.status === 404) {
      stopFollowing();
      run = null;
      $("run").hidden = true;
      showFormProblem(`Run ${runId} was not found: runs are kept for a limited time after their last update (two hours unless configured otherwise). Start a new one below.`);
      return;
    }
    if (response.ok) snapshot = await response.json();
  } catch {
    // unreachable for now: follow the stream anyway, it reopens until the service answers
  }
  // Replay the stream from its first event into fresh state: nothing shown twice, nothing missed.
  showRun(newRun(runId, statusUrl, snapshot?.streamUrl ?? `${statusUrl}/stream`));
}

function follow(current) {
  const url = new URL(apiUrl(current.streamUrl));
  if (current.lastId !== null) url.searchParams.set("lastEventId", current.lastId);
  const source = new EventSource(url);
  current.source = source;
  source.onopen = () => {
    current.reopens = 0;
    $("connection-notice").hidden = true;
  };
  source.onmessage = (message) => {
    if (current.finished) return;
    const event = JSON.parse(message.data);
    const expected = current.lastId === null ? 0 : current.lastId + 1;
    if (event.id < expected) return; // already applied
    if (event.id > expected) {
      // A gap can only mean a broken connection: ask again from the last event applied.
      source.close();
      follow(current);
      return;
    }
    current.lastId = event.id;
    apply(current, event);
    if (TERMINAL_EVENTS.has(event.type)) {
      current.finished = true;
      source.close();
    }
    render();
  };
  source.onerror = () => {
    // CONNECTING: the stream ended (they close on their own) and the browser is reconnecting.
    // CLOSED: it was refused (204 after the end, 404, a 503…): find out which, then maybe reopen.
    if (current.finished || source.readyState !== EventSource.CLOSED) return;
    afterRefusedStream(current);
  };
}

async function afterRefusedStream(current) {
  try {
    const response = await fetch(apiUrl(current.statusUrl), { cache: "no-store" });
    if (response.status === 404) {
      current.finished = true;
      showNotice($("run-problem"), "This run has expired or never existed: runs are kept for a limited time (two hours unless configured otherwise).");
      return;
    }
    const snapshot = response.ok ? await response.json() : null;
    if (snapshot && snapshot.status !== "processing" && snapshot.lastEventId <= (current.lastId ?? -1)) {
      current.finished = true; // the 204: nothing after what this page has
      render();
      return;
    }
  } catch {
    // the service is unreachable: keep trying below
  }
  if (current.finished || current !== run) return;
  current.reopens += 1;
  const pause = Math.min(MAX_REOPEN_PAUSE_SECONDS, 2 ** current.reopens);
  showNotice($("connection-notice"), `Live updates were interrupted. Reconnecting in ${pause} seconds…`);
  current.reopenTimer = setTimeout(() => follow(current), pause * 1000);
}

function card(current, provider) {
  let entry = current.cards.get(provider);
  if (!entry) {
    entry = { provider, status: "pending", activity: [], quote: null, error: null, element: null };
    current.cards.set(provider, entry);
  }
  return entry;
}

function apply(current, event) {
  const name = PROVIDER_NAMES[event.provider] ?? event.provider;
  switch (event.type) {
    case "started":
      current.total = event.total;
      current.progress = { completed: 0, total: event.total, percent: 0 };
      for (const provider of event.providers) card(current, provider);
      break;
    case "activity": {
      const entry = card(current, event.provider);
      if (entry.status === "pending") entry.status = "running";
      entry.activity.push({ id: event.id, message: event.message });
      break;
    }
    case "quote": {
      const entry = card(current, event.provider);
      entry.status = "quoted";
      entry.quote = event.quote;
      announce(`${name}: ${money(event.quote.monthlyPremium, event.quote.currency)} a month${event.quote.source === "simulated" ? ", simulated" : ""}.`);
      break;
    }
    case "provider_error": {
      const entry = card(current, event.provider);
      entry.status = "failed";
      entry.error = { code: event.code, message: event.message, retryable: event.retryable };
      announce(`${name}: no quote. ${plainProblem(event.code, name)}`);
      break;
    }
    case "progress":
      current.progress = { completed: event.completed, total: event.total, percent: event.percent };
      break;
    case "complete":
      current.ranking = event.quotes;
      current.best = event.best;
      current.progress = { ...current.progress, completed: current.progress.total, percent: 100 };
      announce(completionSummary(current));
      break;
    case "error":
      current.failure = { code: event.code, message: event.message };
      for (const entry of current.cards.values()) {
        if (entry.status === "pending" || entry.status === "running") {
          entry.status = "failed";
          entry.error = { code: event.code, message: event.message, retryable: true };
        }
      }
      announce(`The run stopped. ${RUN_PROBLEMS[event.code] ?? event.message}`);
      break;
  }
}

function plainProblem(code, name) {
  return (PROVIDER_PROBLEMS[code] ?? (() => `${name} could not quote (${code}).`))(name);
}

function rankedQuotes(current) {
  if (current.ranking) return current.ranking;
  return [...current.cards.values()]
    .filter((entry) => entry.quote)
    .map((entry) => entry.quote)
    .sort((a, b) => a.monthlyPremium - b.monthlyPremium || a.provider.localeCompare(b.provider));
}

function completionSummary(current) {
  const quotes = rankedQuotes(current);
  const failed = [...current.cards.values()].filter((entry) => entry.status === "failed").length;
  const parts = [`Finished: ${quotes.length} quote${quotes.length === 1 ? "" : "s"}`];
  if (failed) parts.push(`${failed} insurer${failed === 1 ? "" : "s"} could not quote`);
  let text = parts.join(", ") + ".";
  if (current.best) {
    const best = quotes.find((quote) => quote.provider === current.best);
    text += ` Best: ${PROVIDER_NAMES[current.best] ?? current.best}${best ? ` at ${money(best.monthlyPremium, best.currency)} a month` : ""}.`;
  }
  return text;
}

// ---------------------------------------------------------------------------------- rendering

function render() {
  if (!run) return;
  const current = run;
  const { completed, total, percent } = current.progress;
  $("run-progress").value = percent;
  $("progress-text").textContent = total ? `${completed} of ${total} (${percent}%)` : "";
  $("run-status").textContent = current.failure
    ? `The run stopped. ${RUN_PROBLEMS[current.failure.code] ?? current.failure.message}`
    : current.ranking
      ? completionSummary(current)
      : current.lastId === null
        ? "Connecting…"
        : `Asking ${total} insurer${total === 1 ? "" : "s"}…`;
  $("run").dataset.state = current.failure ? "failed" : current.ranking ? "completed" : "processing";
  $("run").dataset.lastEventId = current.lastId ?? "";
  // For a person waiting in another tab.
  const state = current.failure ? "stopped" : current.ranking ? "done" : total ? `${completed} of ${total}` : "";
  document.title = `${state ? `(${state}) ` : ""}${TITLE}`;

  const cards = $("cards");
  for (const entry of current.cards.values()) {
    if (!entry.element) {
      entry.element = cardElement(entry);
      cards.append(entry.element);
    }
    renderCard(current, entry);
  }

  const quotes = rankedQuotes(current);
  const ranking = $("ranking");
  ranking.replaceChildren(...quotes.map((quote, index) => rankingItem(current, quote, index)));
  $("ranking-empty").hidden = quotes.length > 0;
  $("ranking-empty").textContent = current.ranking || current.failure ? "No insurer offered a quote." : "No quotes yet.";
  $("simulated-banner").hidden = !quotes.some((quote) => quote.source === "simulated");
}

function cardElement(entry) {
  const item = document.createElement("li");
  item.className = "card";
  item.dataset.provider = entry.provider;
  const heading = document.createElement("h4");
  heading.textContent = PROVIDER_NAMES[entry.provider] ?? entry.provider;
  const status = element("p", "card-status");
  const activity = element("p", "card-activity");
  const result = element("div", "card-result");
  const log = document.createElement("details");
  log.className = "card-log";
  log.append(document.createElement("summary"), document.createElement("ol"));
  item.append(heading, status, activity, result, log);
  return item;
}

function renderCard(current, entry) {
  const item = entry.element;
  const name = PROVIDER_NAMES[entry.provider] ?? entry.provider;
  item.dataset.status = entry.status;
  item.querySelector(".card-status").textContent = STATUS_LABELS[entry.status] ?? entry.status;
  const latest = entry.activity.at(-1);
  item.querySelector(".card-activity").textContent = latest ? latest.message : "Not started yet.";

  const result = item.querySelector(".card-result");
  if (entry.quote) {
    result.replaceChildren(price(entry.quote, entry.provider === current.best && !!current.ranking));
  } else if (entry.error) {
    const text = element("p", "card-error", plainProblem(entry.error.code, name));
    const more = entry.error.retryable ? " Asking again later may work." : "";
    const detail = element("p", "hint", `${entry.error.message}${more}`);
    result.replaceChildren(text, detail);
  } else {
    result.replaceChildren();
  }

  const log = item.querySelector(".card-log ol");
  for (const { id, message } of entry.activity.slice(log.children.length)) {
    const line = element("li", "", message);
    line.dataset.eventId = id;
    log.append(line);
  }
  item.querySelector(".card-log summary").textContent = `Activity (${entry.activity.length})`;
}

function rankingItem(current, quote, index) {
  const item = document.createElement("li");
  item.dataset.provider = quote.provider;
  const best = current.ranking ? quote.provider === current.best : index === 0;
  if (best) item.classList.add("best");
  const who = element("div", "ranking-who");
  who.append(element("span", "ranking-name", PROVIDER_NAMES[quote.provider] ?? quote.provider));
  if (best) who.append(element("span", "badge badge-best", current.ranking ? "Best price" : "Cheapest so far"));
  item.append(who, price(quote, false));
  return item;
}

function price(quote, best) {
  const box = element("div", "price");
  const monthly = element("p", "price-monthly");
  monthly.append(element("strong", "", money(quote.monthlyPremium, quote.currency)), " a month");
  const details = element(
    "p",
    "price-details",
    `${money(quote.annualPremium, quote.currency)} a year · ${quote.coverage} coverage · ` +
      `${quote.deductible ? `${money(quote.deductible, quote.currency, { whole: true })} deductible` : "no deductible"}`,
  );
  box.append(monthly, details, sourceBadge(quote));
  if (best) box.prepend(element("span", "badge badge-best", "Best price"));
  return box;
}

function sourceBadge(quote) {
  if (quote.source === "simulated") return element("p", "source source-simulated", "Simulated — not a real price");
  const name = PROVIDER_NAMES[quote.provider] ?? quote.provider;
  if (quote.source === "tinyfish") return element("p", "source", `Source: read from ${name}'s website by a web agent`);
  return element("p", "source", `Source: ${quote.source}`);
}

function money(amount, currency = "USD", { whole = false } = {}) {
  const digits = whole && Number.isInteger(amount) ? { minimumFractionDigits: 0 } : {};
  return new Intl.NumberFormat("en-US", { style: "currency", currency, ...digits }).format(amount);
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Polite announcements: quotes, failures and the end; never every activity message. A burst
// (a replayed run) is announced as one summary.
let pending = [];
let announceTimer = 0;

function announce(text) {
  pending.push(text);
  clearTimeout(announceTimer);
  announceTimer = setTimeout(() => {
    const said = pending.length > 3 && run ? burstSummary(run) : pending.join(" ");
    pending = [];
    $("announcer").textContent = said;
  }, 400);
}

function burstSummary(current) {
  if (current.ranking || current.failure) return $("run-status").textContent;
  const { completed, total } = current.progress;
  return `${completed} of ${total} insurers have answered.`;
}

// ---------------------------------------------------------------------------------- start

function route() {
  const runId = new URLSearchParams(location.search).get("run");
  if (runId && run?.id !== runId) {
    resumeRun(runId);
  } else if (!runId && run) {
    stopFollowing();
    run = null;
    $("run").hidden = true;
    document.title = TITLE;
  }
}

function init() {
  $("api-origin").textContent = api === location.origin ? `${api} (this page's origin)` : api;
  const apiKey = $("apiKey");
  apiKey.value = sessionStorage.getItem(API_KEY_STORAGE) ?? "";
  apiKey.addEventListener("input", () => {
    const value = apiKey.value.trim();
    if (value) sessionStorage.setItem(API_KEY_STORAGE, value);
    else sessionStorage.removeItem(API_KEY_STORAGE);
  });
  $("quote-form").addEventListener("submit", startRun);
  window.addEventListener("popstate", route);
  route();
}

init();
