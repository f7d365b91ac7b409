// Compare quotes live: the reference front end of the quote-run API (its contract: API.md, README).
//
// 1. POST /api/quotes with the form's request; a problem response is shown where it belongs.
// 2. Follow the run's event stream with EventSource. The browser reconnects by itself when a
//    stream ends (sending Last-Event-ID); a refused stream is reopened here after a pause, with
//    ?lastEventId= of the last event applied. Events are applied exactly once, in id order.
// 3. The run id goes into this page's URL (?run=…): opening it replays the run's stream from its
//    first event into fresh state, so a reload resumes the run and a link shows its result.
//    Such a run was asked for earlier or by someone else: the form folds away, and the run's
//    snapshot says what it priced (`priced`, nothing personal).
// 4. Stop: POST's cancelToken is kept in this tab's sessionStorage only, so a shared link cannot
//    stop a run; DELETE with it ends the run `cancelled`, keeping the quotes that came.
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

// Where each insurer's own online quote starts: the page its web agent opens
// (lib/providers/tinyfish/goal.py, INSURER_START_URLS; tests/test_page.py keeps the two equal).
const INSURER_QUOTE_PAGES = {
  geico: "https://www.geico.com/auto-insurance/",
  progressive: "https://www.progressive.com/auto/",
  state_farm: "https://www.statefarm.com/insurance/auto",
  allstate: "https://www.allstate.com/auto-insurance",
  liberty_mutual: "https://www.libertymutual.com/auto-insurance",
};

// What each coverage level asks the insurers for (goal.py's COVERAGE_INSTRUCTIONS, in words).
const COVERAGE_WORDS = {
  minimum: "Minimum: your state's required liability only; no cover for damage to your own car",
  standard: "Standard: liability 100/300/100, plus collision and comprehensive cover for your own car",
  full: "Full: liability 250/500/250, uninsured motorist cover, plus collision and comprehensive",
};
const COVERAGE_NAMES = { minimum: "Minimum", standard: "Standard", full: "Full" };
const USE_WORDS = { commute: "used for commuting", pleasure: "used for pleasure", business: "used for business" };
const OWNERSHIP_WORDS = { owned: "owned outright", financed: "financed", leased: "leased" };

const RUN_PROBLEMS = {
  worker_lost: "The run stopped unexpectedly and nothing could resume it. Start it again.",
  deadline_exceeded: "The run ran out of time; insurers that had not answered are marked below.",
  internal: "Something went wrong on our side. Start the run again.",
};

const STATUS_LABELS = {
  pending: "Waiting",
  running: "Working",
  quoted: "Quoted",
  failed: "No quote",
  declined: "Declined",
  cancelled: "Stopped",
};
const TERMINAL_EVENTS = new Set(["complete", "error", "cancelled"]);
const API_KEY_STORAGE = "quotes:apiKey";
// The run's cancel token, for this tab only: a shared ?run= link never carries it.
const CANCEL_TOKEN_STORAGE = (runId) => `quotes:cancelToken:${runId}`;
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

// Every field is required: an empty one is named here, before anything is sent (the API would
// take an absent mileage as 12,000 without a word).
const EMPTY_FIELD_MESSAGES = {
  vin: "Enter the car's VIN: 17 letters and digits, on the registration or the driver's door frame.",
  "vehicle.annualMileage": "Enter how many miles the car is driven a year, such as 12,000.",
  "driver.firstName": "Enter the driver's first name.",
  "driver.lastName": "Enter the driver's last name.",
  "driver.dateOfBirth": "Enter the driver's date of birth: month, day and year.",
  zip: "Enter the 5-digit ZIP code where the car is kept, such as 94107.",
  coverage: "Choose a coverage level.",
  providers: "Choose at least one insurer to ask.",
};

function emptyFields(request) {
  const empty = {
    vin: !request.vin,
    "vehicle.annualMileage": request.vehicle.annualMileage === null,
    "driver.firstName": !request.driver.firstName,
    "driver.lastName": !request.driver.lastName,
    // A date input reads "" while its month, day or year is missing or impossible.
    "driver.dateOfBirth": !request.driver.dateOfBirth,
    zip: !request.zip,
    coverage: !request.coverage,
    providers: request.providers.length === 0,
  };
  return Object.keys(empty)
    .filter((field) => empty[field])
    .map((field) => ({ field, message: EMPTY_FIELD_MESSAGES[field] }));
}

// The API's messages (API.md) in a person's words, with what to do.
function plainFieldMessage(field, message) {
  const text = String(message);
  if (field === "vin") {
    if (/check digit/.test(text)) {
      return "This VIN's check digit doesn't match: check the 9th character, then the others, against your registration.";
    }
    const length = /must be 17 characters, got (\d+)/.exec(text);
    if (length) return `A VIN has 17 letters and digits; this one has ${length[1]}. Check it against your registration.`;
    if (/I, O or Q/.test(text)) return "A VIN never uses the letters I, O or Q: they are the digits 1 and 0.";
    return "A VIN has only letters and digits: check it against your registration.";
  }
  if (field === "zip") return "Enter a 5-digit ZIP code, such as 94107 (or ZIP+4, such as 94107-1234).";
  if (field === "driver.firstName" || field === "driver.lastName") {
    const which = field === "driver.firstName" ? "first" : "last";
    if (/1 to 64/.test(text)) return `Enter the driver's ${which} name, at most 64 characters.`;
    return `Use only letters, spaces, apostrophes, hyphens and periods in the ${which} name.`;
  }
  if (field === "driver.dateOfBirth") {
    if (/16 to 100/.test(text)) return "The driver must be 16 to 100 years old today: check the year of birth.";
    return "Enter the driver's date of birth: month, day and year.";
  }
  if (field === "vehicle.annualMileage") {
    return "Enter the miles driven a year as a whole number from 0 to 150,000, such as 12,000.";
  }
  if (field === "coverage") return "Choose a coverage level.";
  if (field === "vehicle.use" || field === "vehicle.ownership") return "Choose one of the options.";
  if (field === "providers") return "Choose at least one insurer to ask.";
  if (/^providers\.\d+$/.test(field)) {
    if (/listed twice/.test(text)) return "This insurer was chosen twice; reload the page and choose again.";
    if (/not allowed/.test(text)) return "Your access does not include this insurer: untick it and try again.";
    return "This insurer is not offered here right now: untick it and try again.";
  }
  return text;
}

function idempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function startRun(event) {
  event.preventDefault();
  clearProblems();
  const request = readRequest();
  const empty = emptyFields(request);
  if (empty.length) {
    showFieldErrors(empty, request, { plain: true });
    return;
  }
  const body = JSON.stringify(request);
  // The same request retried after a lost response is the same run: reuse its Idempotency-Key.
  const key = lastAttempt?.body === body ? lastAttempt.key : idempotencyKey();
  const headers = { "Content-Type": "application/json", "Idempotency-Key": key };
  const apiKey = $("apiKey").value.trim();
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;

  // The old result goes at once: nothing on screen may pass for the new run's.
  leaveRun();
  showStarting();
  const button = $("submit");
  button.disabled = true;
  button.textContent = "Starting…";
  try {
    let response;
    try {
      response = await fetch(apiUrl("/api/quotes"), { method: "POST", headers, body });
    } catch {
      lastAttempt = { body, key };
      hideRun();
      showFormProblem(`Could not reach the quote service at ${api}. Check your connection and try again.`);
      return;
    }
    lastAttempt = null;
    if (response.status === 202 || response.status === 200) {
      const started = await response.json();
      if (started.cancelToken) sessionStorage.setItem(CANCEL_TOKEN_STORAGE(started.runId), started.cancelToken);
      history.pushState({ run: started.runId }, "", pageUrl(started.runId));
      showRun(newRun(started.runId, started.statusUrl, started.streamUrl), { mine: true });
      announce("Run started: asking the insurers.");
    } else {
      hideRun();
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
      showFieldErrors([{ field: "apiKey", message: $("apiKey").value ? "This key was refused." : "Enter your API key." }], request, { plain: true });
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

function showFieldErrors(errors, request, { plain = false } = {}) {
  const summary = document.createElement("ul");
  for (const { field, message } of errors) {
    const words = plain ? message : plainFieldMessage(String(field), message);
    const { container, target, label, shared, group } = locateField(String(field), request);
    if (container) {
      const slot = container.querySelector(".field-error");
      slot.hidden = false;
      // One slot serves all the insurers' boxes: say which one each message is about.
      slot.append(...(slot.childNodes.length ? [document.createElement("br")] : []), shared ? `${label}: ${words}` : words);
      // A problem with the whole group (no insurer chosen) marks the group, not one box.
      if (!group) (target ?? container).setAttribute("aria-invalid", "true");
      if (shared) target?.closest(".choice")?.classList.add("has-error");
      else container.classList.add("has-error");
    }
    const item = document.createElement("li");
    const link = document.createElement(target?.id ? "a" : "span");
    if (target?.id) link.href = `#${target.id}`;
    link.textContent = `${label}: ${words}`;
    item.append(link);
    summary.append(item);
  }
  const box = $("form-problem");
  box.replaceChildren(Object.assign(document.createElement("p"), { textContent: "Please check these details:" }), summary);
  box.hidden = false;
  box.focus();
}

// A summary link moves focus to its field, scrolled into the middle, with its focus ring showing.
function followProblemLink(event) {
  const link = event.target.closest("a[href^='#']");
  if (!link) return;
  const target = document.getElementById(decodeURIComponent(link.hash.slice(1)));
  if (!target) return;
  event.preventDefault();
  target.scrollIntoView({ block: "center" });
  target.focus({ preventScroll: true });
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
      return { container, target, label, group: container.tagName === "FIELDSET" };
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

function showFormProblem(text, action) {
  showNotice($("form-problem"), text);
  if (action) $("form-problem").append(action);
  $("form-problem").focus();
}

function showNotice(box, text) {
  box.replaceChildren(Object.assign(document.createElement("p"), { textContent: text }));
  box.hidden = false;
}

// A run shown from a link or a reload was asked for by someone else, or earlier: the form folds
// away, so its sample (or leftover) details never pass for what that run priced.
function foldForm(folded) {
  $("quote-form").hidden = folded;
  $("form-hint").hidden = folded;
  $("form-folded").hidden = !folded;
  $("form-heading").textContent = folded ? "New comparison" : "Your details";
}

function startNewComparison() {
  history.pushState({}, "", pageUrl(null));
  route();
  clearProblems();
  $("vin").focus();
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
    ranking: null, // the terminal event's quotes, cheapest first
    best: null,
    failure: null, // {code, message} of a failed run
    cancelled: false, // ended by Stop (DELETE): its unfinished insurers were stopped
    priced: null, // the snapshot's `priced`: what the run asked for, nothing personal
  };
}

function resetRunView() {
  $("cards").replaceChildren();
  $("ranking").replaceChildren();
  $("unquoted").replaceChildren();
  $("unquoted-box").hidden = true;
  $("run-priced").hidden = true;
  $("stop").hidden = true;
  $("stop").disabled = false;
  $("stop-status").textContent = "";
  $("copy-status").textContent = "";
  for (const id of ["simulated-banner", "connection-notice", "run-problem"]) $(id).hidden = true;
}

// Between pressing Compare and the run's answer: an empty run, so no old result stays on show.
function showStarting() {
  resetRunView();
  $("run").hidden = false;
  $("run").dataset.state = "starting";
  $("run-status").textContent = "Starting your comparison…";
  $("run-progress").value = 0;
  $("progress-text").textContent = "";
  $("ranking-empty").hidden = false;
  $("ranking-empty").textContent = "No quotes yet.";
  $("run-link").value = "";
  $("run-id").textContent = "";
  document.title = TITLE;
}

function hideRun() {
  $("run").hidden = true;
  delete $("run").dataset.state;
}

function leaveRun() {
  stopFollowing();
  run = null;
}

function showRun(next, { mine = false } = {}) {
  stopFollowing();
  run = next;
  resetRunView();
  foldForm(!mine);
  $("run").hidden = false;
  $("run-id").textContent = run.id;
  $("run-link").value = shareUrl(run.id);
  render();
  follow(run);
  loadPriced(run);
  // On a phone the run sits above the form: bring its heading into view. On a wide screen it
  // is already in view beside the form, and the page stays where it is.
  const heading = $("run-heading");
  const top = heading.getBoundingClientRect().top;
  if (top < 0 || top > window.innerHeight * 0.5) {
    // With the title too when both fit: the page's top, else the heading at the top.
    const fromTop = top + window.scrollY;
    if (fromTop < window.innerHeight * 0.5) window.scrollTo({ top: 0 });
    else heading.scrollIntoView({ block: "start" });
  }
  heading.focus({ preventScroll: true });
}

// The link to share: this page's address with ?run= (and ?api= if given), nothing else.
function shareUrl(runId) {
  const url = new URL(location.pathname, location.origin);
  const given = new URLSearchParams(location.search).get("api");
  if (given) url.searchParams.set("api", given);
  url.searchParams.set("run", runId);
  return url.href;
}

function stopFollowing() {
  if (!run) return;
  run.source?.close();
  clearTimeout(run.reopenTimer);
  run.finished = true;
}

async function loadPriced(current, known) {
  let snapshot = known;
  if (!snapshot) {
    try {
      const response = await fetch(apiUrl(current.statusUrl), { cache: "no-store" });
      if (!response.ok) return;
      snapshot = await response.json();
    } catch {
      return; // the stream's own retries say what there is to say about the connection
    }
  }
  if (current !== run || !snapshot.priced) return;
  current.priced = snapshot.priced;
  render();
}

async function resumeRun(runId) {
  const statusUrl = `/api/quotes/${encodeURIComponent(runId)}`;
  let snapshot = null;
  leaveRun();
  showStarting();
  $("run-status").textContent = "Loading these results…";
  try {
    const response = await fetch(apiUrl(statusUrl), { cache: "no-store" });
    if (response.status === 404) {
      showUnknownRun(runId);
      return;
    }
    if (response.ok) snapshot = await response.json();
  } catch {
    // unreachable for now: follow the stream anyway, it reopens until the service answers
  }
  // Replay the stream from its first event into fresh state: nothing shown twice, nothing missed.
  const resumed = newRun(runId, statusUrl, snapshot?.streamUrl ?? `${statusUrl}/stream`);
  showRun(resumed);
  if (snapshot) loadPriced(resumed, snapshot);
}

// An unknown or expired run: say so, clean the address, and offer a new comparison.
function showUnknownRun(runId) {
  leaveRun();
  hideRun();
  foldForm(false);
  history.replaceState({}, "", pageUrl(null));
  document.title = TITLE;
  const start = element("button", "button-secondary", "Start a new comparison");
  start.type = "button";
  start.addEventListener("click", () => {
    $("form-problem").hidden = true;
    $("vin").focus();
  });
  showFormProblem(
    `Run ${runId} was not found: results are kept for two hours after a run's last update, so it may have expired, or the link may be incomplete. Start a new comparison below; the form is filled in with a sample driver and car.`,
    start,
  );
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
      sessionStorage.removeItem(CANCEL_TOKEN_STORAGE(current.id)); // nothing left to stop
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
      showNotice($("run-problem"), "These results have expired: runs are kept for two hours after their last update. Start a new comparison.");
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

// ---------------------------------------------------------------------------------- stop

async function stopRun() {
  const current = run;
  const token = current && sessionStorage.getItem(CANCEL_TOKEN_STORAGE(current.id));
  if (!current || !token || !isGoing(current)) return;
  const button = $("stop");
  button.disabled = true;
  button.textContent = "Stopping…";
  const said = (text) => {
    $("stop-status").textContent = text;
  };
  try {
    const response = await fetch(apiUrl(current.statusUrl), {
      method: "DELETE",
      headers: { Authorization: `Bearer ${token}` },
    });
    if (current !== run) return;
    if (response.ok) {
      sessionStorage.removeItem(CANCEL_TOKEN_STORAGE(current.id));
      applyCancelledSnapshot(current, await response.json());
      render();
      said("Stopped. The quotes that had arrived are kept; the insurers still working were stopped.");
      $("run-heading").focus();
      return;
    }
    if (response.status === 409) {
      sessionStorage.removeItem(CANCEL_TOKEN_STORAGE(current.id));
      said("This run had already finished; nothing was stopped.");
    } else if (response.status === 401) {
      sessionStorage.removeItem(CANCEL_TOKEN_STORAGE(current.id));
      said("This tab can no longer stop this run. It will finish on its own.");
    } else if (response.status === 404) {
      said("These results have expired; there is nothing left to stop.");
    } else if (response.status === 405) {
      said("This service cannot stop a run yet. It will finish on its own.");
    } else {
      said(`Could not stop the run (HTTP ${response.status}). Try again.`);
    }
  } catch {
    said("Could not reach the quote service to stop the run. Check your connection and try again.");
  } finally {
    button.disabled = false;
    button.textContent = "Stop asking insurers";
    render();
  }
}

// The DELETE's answer is the run's snapshot: show it at once, before the stream's `cancelled`.
function applyCancelledSnapshot(current, snapshot) {
  if (!snapshot || snapshot.status !== "cancelled") return;
  for (const state of snapshot.providers ?? []) {
    const entry = card(current, state.provider);
    if (state.quote) {
      entry.status = "quoted";
      entry.quote = state.quote;
    } else if (state.status === "failed" && state.error) {
      entry.status = "failed";
      entry.error = { ...state.error, retryable: entry.error?.retryable ?? false };
    } else if (state.status === "cancelled") {
      entry.status = "cancelled";
    }
  }
  current.ranking = snapshot.quotes ?? [];
  current.best = current.ranking[0]?.provider ?? null;
  current.cancelled = true;
  current.progress = { ...current.progress, ...(snapshot.progress ?? {}) };
}

function isGoing(current) {
  return !current.ranking && !current.failure && !current.cancelled;
}

// ---------------------------------------------------------------------------------- events

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
    case "cancelled": {
      const already = current.cancelled;
      current.ranking = event.quotes;
      current.best = event.best;
      current.cancelled = true;
      for (const provider of event.stopped ?? []) {
        const entry = card(current, provider);
        if (!entry.quote) entry.status = "cancelled";
      }
      if (!already) announce(completionSummary(current));
      break;
    }
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
  const entries = [...current.cards.values()];
  const failed = entries.filter((entry) => entry.status === "failed").length;
  const stopped = entries.filter((entry) => entry.status === "cancelled").length;
  const parts = [`${current.cancelled ? "Stopped" : "Finished"}: ${quotes.length} quote${quotes.length === 1 ? "" : "s"}`];
  if (failed) parts.push(`${failed} insurer${failed === 1 ? "" : "s"} could not quote`);
  if (stopped) parts.push(`${stopped} insurer${stopped === 1 ? " was" : "s were"} stopped before answering`);
  let text = parts.join(", ") + ".";
  if (current.best) {
    const best = quotes.find((quote) => quote.provider === current.best);
    text += ` Best: ${PROVIDER_NAMES[current.best] ?? current.best}${best ? ` at ${money(best.monthlyPremium, best.currency)} a month` : ""}.`;
  }
  return text;
}

// ---------------------------------------------------------------------------------- rendering

function runState(current) {
  if (current.failure) return "failed";
  if (current.cancelled) return "cancelled";
  if (current.ranking) return "completed";
  return "processing";
}

function render() {
  if (!run) return;
  const current = run;
  const { completed, total, percent } = current.progress;
  const state = runState(current);
  $("run-progress").value = percent;
  $("progress-text").textContent = total ? `${completed} of ${total} (${percent}%)` : "";
  $("run-status").textContent = current.failure
    ? `The run stopped. ${RUN_PROBLEMS[current.failure.code] ?? current.failure.message}`
    : current.ranking
      ? completionSummary(current)
      : current.lastId === null
        ? "Connecting…"
        : `Asking ${total} insurer${total === 1 ? "" : "s"}…`;
  $("run").dataset.state = state;
  $("run").dataset.lastEventId = current.lastId ?? "";
  // Stop only where this tab started the run (a shared link has no token) and while it is going.
  $("stop").hidden = state !== "processing" || !sessionStorage.getItem(CANCEL_TOKEN_STORAGE(current.id));
  // For a person waiting in another tab.
  const shortState = { failed: "stopped", cancelled: "stopped", completed: "done" }[state] ?? (total ? `${completed} of ${total}` : "");
  document.title = `${shortState ? `(${shortState}) ` : ""}${TITLE}`;

  renderPriced(current);

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
  $("ranking-note").hidden = quotes.length === 0;
  $("ranking-empty").textContent = state === "processing" ? "No quotes yet." : "No insurer offered a quote.";
  renderUnquoted(current);
  $("simulated-banner").hidden = !quotes.some((quote) => quote.source === "simulated");
}

function renderPriced(current) {
  const priced = current.priced;
  const box = $("run-priced");
  if (priced && box.hidden) box.open = window.matchMedia("(min-width: 960px)").matches; // a line on a phone
  box.hidden = !priced;
  if (!priced) return;
  const { vehicle } = priced;
  $("priced-summary").textContent =
    `VIN ending ${priced.vinEnding} · ZIP ${priced.zip} · ${COVERAGE_NAMES[priced.coverage] ?? priced.coverage} coverage · ` +
    `${priced.providers.length} insurer${priced.providers.length === 1 ? "" : "s"}`;
  $("priced-car").textContent =
    `VIN ending ${priced.vinEnding}, ${USE_WORDS[vehicle.use] ?? vehicle.use}, ` +
    `${vehicle.annualMileage.toLocaleString("en-US")} miles a year, ${OWNERSHIP_WORDS[vehicle.ownership] ?? vehicle.ownership}`;
  $("priced-zip").textContent = priced.zip;
  $("priced-coverage").textContent = COVERAGE_WORDS[priced.coverage] ?? priced.coverage;
  $("priced-providers").textContent = priced.providers.map((p) => PROVIDER_NAMES[p] ?? p).join(", ");
}

// Under the ranking: every insurer that gave no quote, and why, so none silently vanishes.
function renderUnquoted(current) {
  const missing = [...current.cards.values()].filter((entry) => entry.status === "failed" || entry.status === "cancelled");
  $("unquoted-box").hidden = missing.length === 0;
  $("unquoted").replaceChildren(
    ...missing.map((entry) => {
      const item = element("li");
      item.dataset.provider = entry.provider;
      item.textContent = outcomeText(entry);
      return item;
    }),
  );
}

function outcomeText(entry) {
  const name = PROVIDER_NAMES[entry.provider] ?? entry.provider;
  if (entry.status === "cancelled") return `${name} was stopped before it answered.`;
  if (entry.error) return plainProblem(entry.error.code, name);
  return "";
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

function shownStatus(entry) {
  if (entry.status === "failed" && entry.error?.code === "provider_declined") return "declined";
  return entry.status;
}

function renderCard(current, entry) {
  const item = entry.element;
  const name = PROVIDER_NAMES[entry.provider] ?? entry.provider;
  item.dataset.status = entry.status;
  item.querySelector(".card-status").textContent = STATUS_LABELS[shownStatus(entry)] ?? entry.status;
  // While an insurer is being asked, its agent's latest step; once it has answered, its outcome.
  const working = entry.status === "pending" || entry.status === "running";
  const activity = item.querySelector(".card-activity");
  const latest = entry.activity.at(-1);
  activity.hidden = !working;
  activity.textContent = working ? (latest ? latest.message : "Waiting to start.") : "";

  const result = item.querySelector(".card-result");
  if (entry.quote) {
    result.replaceChildren(
      price(entry.quote, entry.provider === current.best && current.ranking !== null, { full: true }),
      insurerLink(entry.provider, entry.quote.source === "simulated" ? `Get a real quote from ${name}` : `Continue with ${name}`),
    );
  } else if (entry.status === "cancelled") {
    result.replaceChildren(
      element("p", "card-error", `Stopped before ${name} answered.`),
      insurerLink(entry.provider, `Get a quote from ${name}`),
    );
  } else if (entry.error) {
    const text = element("p", "card-error", plainProblem(entry.error.code, name));
    const more = entry.error.retryable ? "Asking again later may work." : "";
    const parts = [text];
    if (more) parts.push(element("p", "hint", more));
    parts.push(insurerLink(entry.provider, `Try ${name}'s own quote page`));
    result.replaceChildren(...parts);
  } else {
    result.replaceChildren();
  }

  const log = item.querySelector(".card-log ol");
  for (const { id, message } of entry.activity.slice(log.children.length)) {
    const line = element("li", "", message);
    line.dataset.eventId = id;
    log.append(line);
  }
  item.querySelector(".card-log summary").textContent = `What the agent did (${entry.activity.length} steps)`;
}

function insurerLink(provider, text) {
  const href = INSURER_QUOTE_PAGES[provider];
  if (!href) return document.createTextNode("");
  const link = element("a", "insurer-link", text);
  link.href = href;
  link.target = "_blank";
  link.rel = "noopener";
  link.append(element("span", "visually-hidden", " (opens the insurer's site in a new tab; you enter your details there again)"));
  return element("p", "insurer", undefined, [link]);
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

// A price: monthly and yearly, what it covers, and where it came from; simulated on every figure.
function price(quote, best, { full = false } = {}) {
  const simulated = quote.source === "simulated";
  const figure = (amount) => {
    const strong = element("strong", "", money(amount, quote.currency));
    return simulated ? [strong, element("span", "sim-tag", "simulated")] : [strong];
  };
  const box = element("div", "price");
  const monthly = element("p", "price-monthly");
  monthly.append(...figure(quote.monthlyPremium), " a month");
  const yearly = element("p", "price-yearly");
  yearly.append(...figure(quote.annualPremium), " a year");
  const deductible = quote.deductible
    ? `${money(quote.deductible, quote.currency, { whole: true })} deductible`
    : "no deductible";
  const covers = element("p", "price-details", `${COVERAGE_NAMES[quote.coverage] ?? quote.coverage} coverage · ${deductible}`);
  box.append(monthly, yearly, covers);
  if (full) {
    box.append(element("p", "price-covers", COVERAGE_WORDS[quote.coverage] ?? ""));
    const when = element("p", "price-when");
    const time = element("time", "", quotedAt(quote.quotedAt));
    time.dateTime = quote.quotedAt;
    when.append("Quoted ", time);
    box.append(when);
  }
  box.append(sourceBadge(quote));
  if (best) box.prepend(element("span", "badge badge-best", "Best price"));
  return box;
}

function quotedAt(iso) {
  const at = new Date(iso);
  if (Number.isNaN(at.getTime())) return iso;
  const sameDay = at.toDateString() === new Date().toDateString();
  const time = at.toLocaleTimeString([], { hour: "numeric", minute: "2-digit" });
  return sameDay ? `today at ${time}` : `${at.toLocaleDateString([], { month: "short", day: "numeric" })} at ${time}`;
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

function element(tag, className, text, children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  if (children) node.append(...children);
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

// ---------------------------------------------------------------------------------- sharing

async function copyLink() {
  const input = $("run-link");
  const said = (text) => {
    $("copy-status").textContent = text;
  };
  try {
    await navigator.clipboard.writeText(input.value);
    said("Link copied. Paste it anywhere to come back to these results.");
  } catch {
    // No clipboard permission (an embedded page, an old browser): leave the link selected.
    input.focus();
    input.select();
    said("Couldn't copy by itself: the link is selected, copy it with your keyboard or menu.");
  }
}

// ---------------------------------------------------------------------------------- start

function route() {
  const runId = new URLSearchParams(location.search).get("run");
  if (runId && run?.id !== runId) {
    resumeRun(runId);
  } else if (!runId && run) {
    leaveRun();
    hideRun();
    foldForm(false);
    document.title = TITLE;
  } else if (!runId) {
    foldForm(false);
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
  $("form-problem").addEventListener("click", followProblemLink);
  $("stop").addEventListener("click", stopRun);
  $("copy-link").addEventListener("click", copyLink);
  $("new-comparison").addEventListener("click", startNewComparison);
  window.addEventListener("popstate", route);
  route();
}

init();
