// The page for people: picks or records audio, calls the public /v1/audio API (transcriptions with stream=true: the
// transcript shows as it is decoded; translations, which do not stream, as verbose_json), plays the audio back with
// the spoken word highlighted, exports the transcript. Live mode streams the microphone to /v1/realtime (OpenAI's
// Realtime protocol) and shows captions turn by turn.
'use strict';

(() => {
  // Whisper large-v3's languages (ISO 639-1 codes as the API takes them), sorted by name.
  const LANGUAGES = [
    ['af', 'Afrikaans'], ['sq', 'Albanian'], ['am', 'Amharic'], ['ar', 'Arabic'], ['hy', 'Armenian'],
    ['as', 'Assamese'], ['az', 'Azerbaijani'], ['ba', 'Bashkir'], ['eu', 'Basque'], ['be', 'Belarusian'],
    ['bn', 'Bengali'], ['bs', 'Bosnian'], ['br', 'Breton'], ['bg', 'Bulgarian'], ['my', 'Burmese'],
    ['yue', 'Cantonese'], ['ca', 'Catalan'], ['zh', 'Chinese'], ['hr', 'Croatian'], ['cs', 'Czech'],
    ['da', 'Danish'], ['nl', 'Dutch'], ['en', 'English'], ['et', 'Estonian'], ['fo', 'Faroese'],
    ['fi', 'Finnish'], ['fr', 'French'], ['gl', 'Galician'], ['ka', 'Georgian'], ['de', 'German'],
    ['el', 'Greek'], ['gu', 'Gujarati'], ['ht', 'Haitian Creole'], ['ha', 'Hausa'], ['haw', 'Hawaiian'],
    ['he', 'Hebrew'], ['hi', 'Hindi'], ['hu', 'Hungarian'], ['is', 'Icelandic'], ['id', 'Indonesian'],
    ['it', 'Italian'], ['ja', 'Japanese'], ['jw', 'Javanese'], ['kn', 'Kannada'], ['kk', 'Kazakh'],
    ['km', 'Khmer'], ['ko', 'Korean'], ['lo', 'Lao'], ['la', 'Latin'], ['lv', 'Latvian'],
    ['ln', 'Lingala'], ['lt', 'Lithuanian'], ['lb', 'Luxembourgish'], ['mk', 'Macedonian'], ['mg', 'Malagasy'],
    ['ms', 'Malay'], ['ml', 'Malayalam'], ['mt', 'Maltese'], ['mi', 'Maori'], ['mr', 'Marathi'],
    ['mn', 'Mongolian'], ['ne', 'Nepali'], ['no', 'Norwegian'], ['nn', 'Norwegian Nynorsk'], ['oc', 'Occitan'],
    ['ps', 'Pashto'], ['fa', 'Persian'], ['pl', 'Polish'], ['pt', 'Portuguese'], ['pa', 'Punjabi'],
    ['ro', 'Romanian'], ['ru', 'Russian'], ['sa', 'Sanskrit'], ['sr', 'Serbian'], ['sn', 'Shona'],
    ['sd', 'Sindhi'], ['si', 'Sinhala'], ['sk', 'Slovak'], ['sl', 'Slovenian'], ['so', 'Somali'],
    ['es', 'Spanish'], ['su', 'Sundanese'], ['sw', 'Swahili'], ['sv', 'Swedish'], ['tl', 'Tagalog'],
    ['tg', 'Tajik'], ['ta', 'Tamil'], ['tt', 'Tatar'], ['te', 'Telugu'], ['th', 'Thai'],
    ['bo', 'Tibetan'], ['tr', 'Turkish'], ['tk', 'Turkmen'], ['uk', 'Ukrainian'], ['ur', 'Urdu'],
    ['uz', 'Uzbek'], ['vi', 'Vietnamese'], ['cy', 'Welsh'], ['yi', 'Yiddish'], ['yo', 'Yoruba'],
  ];

  const KEY_STORAGE = 'whisper.apiKey';
  const DOWNLOAD_TYPES = { txt: 'text/plain', srt: 'application/x-subrip', vtt: 'text/vtt' };

  const byId = (id) => document.getElementById(id);
  const ui = {
    form: byId('transcribe-form'),
    modelLine: byId('model-line'),
    dropZone: byId('drop-zone'),
    fileInput: byId('file-input'),
    recordButton: byId('record-button'),
    recordLabel: byId('record-label'),
    recordNote: byId('record-note'),
    liveButton: byId('live-button'),
    liveLabel: byId('live-label'),
    liveNote: byId('live-note'),
    translateOption: byId('translate-option'),
    languageField: byId('language-field'),
    capabilityNote: byId('capability-note'),
    chosen: byId('chosen-audio'),
    language: byId('language'),
    outputFormat: byId('output-format'),
    prompt: byId('prompt'),
    keyField: byId('key-field'),
    apiKey: byId('api-key'),
    rememberKey: byId('remember-key'),
    submit: byId('submit-button'),
    cancel: byId('cancel-button'),
    progress: byId('progress'),
    status: byId('status-line'),
    meta: byId('result-meta'),
    output: byId('output'),
    placeholder: byId('placeholder'),
    errorBox: byId('error-box'),
    errorHeading: byId('error-heading'),
    errorMessage: byId('error-message'),
    errorDetail: byId('error-detail'),
    segments: byId('segments'),
    captions: byId('captions'),
    formatted: byId('formatted'),
    player: byId('player'),
    copy: byId('copy-button'),
    downloads: Array.from(document.querySelectorAll('button.download')),
  };

  const state = {
    audio: null, // { blob, name }
    modelId: null,
    result: null, // { text, segments, words, language, baseName }
    audioUrl: null, // the chosen audio, for the player
    wordSpans: [], // the rendered words in time order, for highlighting
    currentWord: null,
    request: null, // the XMLHttpRequest in flight
    ticker: null,
    recorder: null,
  };

  // ---- formatting -------------------------------------------------------------------------

  function formatBytes(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
  }

  function formatDuration(seconds) {
    const whole = Math.round(seconds);
    const h = Math.floor(whole / 3600);
    const m = Math.floor((whole % 3600) / 60);
    const s = String(whole % 60).padStart(2, '0');
    return h ? `${h}:${String(m).padStart(2, '0')}:${s}` : `${m}:${s}`;
  }

  // HH:MM:SS,mmm for SRT, HH:MM:SS.mmm for WebVTT.
  function cueTime(seconds, separator) {
    const ms = Math.max(0, Math.round(seconds * 1000));
    const pad = (n, width) => String(n).padStart(width, '0');
    return `${pad(Math.floor(ms / 3600000), 2)}:${pad(Math.floor(ms / 60000) % 60, 2)}:` +
      `${pad(Math.floor(ms / 1000) % 60, 2)}${separator}${pad(ms % 1000, 3)}`;
  }

  // The short form shown beside each segment: M:SS.s
  function segmentTime(seconds) {
    const tenths = Math.max(0, Math.round(seconds * 10));
    const m = Math.floor(tenths / 600);
    const s = ((tenths % 600) / 10).toFixed(1).padStart(4, '0');
    return `${m}:${s}`;
  }

  // Segments worth a cue: subtitles have no empty cues, and a blank line would end a cue early.
  function cues() {
    return state.result.segments
      .map((seg) => ({
        start: seg.start,
        end: Math.max(seg.start, seg.end),
        text: seg.text.trim().replace(/\n\s*\n/g, '\n').replace(/-->/g, '->'),
      }))
      .filter((cue) => cue.text !== '');
  }

  const FORMATTERS = {
    segments: () => cues().map((c) => `[${segmentTime(c.start)} – ${segmentTime(c.end)}] ${c.text}`).join('\n'),
    txt: () => `${state.result.text.trim()}\n`,
    srt: () => cues().map((c, i) =>
      `${i + 1}\n${cueTime(c.start, ',')} --> ${cueTime(c.end, ',')}\n${c.text}\n`).join('\n'),
    vtt: () => `WEBVTT\n\n${cues().map((c) =>
      `${cueTime(c.start, '.')} --> ${cueTime(c.end, '.')}\n${c.text}\n`).join('\n')}`,
  };

  // ---- status and output ------------------------------------------------------------------

  function setStatus(text) {
    ui.status.textContent = text || '\u00a0';
  }

  function setProgress(mode, percent) {
    ui.progress.classList.toggle('idle', mode === 'idle');
    if (mode === 'determinate') ui.progress.value = percent;
    else ui.progress.removeAttribute('value'); // no value: the browser shows an indeterminate bar
  }

  function showOnly(element) {
    for (const el of [ui.placeholder, ui.errorBox, ui.segments, ui.captions, ui.formatted]) el.hidden = el !== element;
  }

  // On a phone the transcript area is below the fold: bring the answer into view once it arrives.
  function revealOutput() {
    const smooth = !window.matchMedia('(prefers-reduced-motion: reduce)').matches;
    ui.output.scrollIntoView({ block: 'nearest', behavior: smooth ? 'smooth' : 'auto' });
  }

  function setActionsEnabled(enabled) {
    ui.copy.disabled = !enabled;
    for (const button of ui.downloads) button.disabled = !enabled;
  }

  // A segment's text with its words as clickable spans, taken from `words` from index `next` on: each word is looked
  // up in the text after the one before, so the text reads exactly as the server wrote it. A word not in this
  // segment's rest is the next segment's if that one has it, else it is passed over. Returns the next word's index.
  function segmentText(cue, nextCue, words, next) {
    const text = document.createElement('span');
    text.className = 'segment-text';
    let cursor = 0;
    for (; next < words.length; next += 1) {
      const word = words[next];
      const at = word.word ? cue.text.indexOf(word.word, cursor) : -1;
      if (at < 0) {
        if (nextCue && nextCue.text.includes(word.word)) break;
        continue;
      }
      text.append(cue.text.slice(cursor, at));
      const span = document.createElement('span');
      span.className = 'word';
      span.textContent = word.word;
      span.dataset.start = String(word.start);
      span.dataset.end = String(word.end);
      text.append(span);
      state.wordSpans.push(span);
      cursor = at + word.word.length;
    }
    text.append(cue.text.slice(cursor));
    return { text, next };
  }

  function renderResult() {
    const format = ui.outputFormat.value;
    state.wordSpans = [];
    state.currentWord = null;
    if (!state.result.text.trim() && !cues().length) {
      showPlaceholder(state.streaming ? 'Waiting for the first words…' : 'The server found no speech in this audio.');
    } else if (format === 'segments') {
      const all = cues();
      let next = 0;
      ui.segments.replaceChildren(...all.map((cue, i) => {
        const item = document.createElement('li');
        const time = document.createElement('time');
        time.dateTime = `PT${cue.start.toFixed(2)}S`;
        time.textContent = `${segmentTime(cue.start)} – ${segmentTime(cue.end)}`;
        const marked = segmentText(cue, all[i + 1], state.result.words, next);
        next = marked.next;
        item.append(time, marked.text);
        return item;
      }));
      showOnly(ui.segments);
      highlightWord();
    } else {
      ui.formatted.textContent = FORMATTERS[format]();
      showOnly(ui.formatted);
    }
  }

  // ---- playback ---------------------------------------------------------------------------

  // The word being spoken: the last one started (a millisecond's slack for the player's rounding) and not yet over.
  function highlightWord() {
    const t = ui.player.currentTime + 0.001;
    const spans = state.wordSpans;
    let low = 0;
    let high = spans.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (Number(spans[middle].dataset.start) <= t) low = middle + 1;
      else high = middle;
    }
    const candidate = spans[low - 1];
    const word = candidate && t <= Math.max(Number(candidate.dataset.end), Number(candidate.dataset.start) + 0.05)
      ? candidate : null;
    if (word === state.currentWord) return;
    state.currentWord?.classList.remove('current');
    state.currentWord?.removeAttribute('aria-current');
    word?.classList.add('current');
    word?.setAttribute('aria-current', 'true');
    state.currentWord = word;
  }

  // timeupdate fires a few times a second; while playing, follow every frame so short words are not skipped.
  function followPlayback() {
    highlightWord();
    if (!ui.player.paused) requestAnimationFrame(followPlayback);
  }

  ui.player.addEventListener('play', followPlayback);
  ui.player.addEventListener('seeked', highlightWord);
  ui.player.addEventListener('timeupdate', highlightWord);
  ui.segments.addEventListener('click', (event) => {
    const span = event.target.closest('.word');
    if (!span) return;
    ui.player.currentTime = Number(span.dataset.start);
    highlightWord();
  });

  function showPlaceholder(text) {
    ui.placeholder.textContent = text;
    showOnly(ui.placeholder);
  }

  // ---- errors -----------------------------------------------------------------------------

  // A heading a person understands, from the API's error code where it has one, else from the HTTP status.
  const NOT_AUDIO = 'Not audio: the server could not read this file as audio';
  const HEADINGS_BY_CODE = {
    invalid_api_key: 'Unauthorised: the API key is missing or wrong',
    request_too_large: 'Too large: the file is over this server\'s upload limit',
    audio_too_long: 'Too long: the audio is over this server\'s length limit',
    invalid_audio: NOT_AUDIO,
    unsupported_media: NOT_AUDIO,
    empty_audio: 'No audio: the file holds no sound',
    empty_file: 'Empty file: the file has no content',
    model_loading: 'Not ready: the model is still loading',
    draining: 'Not available: this server is shutting down',
    out_of_memory: 'Server busy: the GPU ran out of memory',
    request_timeout: 'Too slow: the server gave up on this request',
  };
  const HEADINGS_BY_STATUS = {
    401: HEADINGS_BY_CODE.invalid_api_key,
    403: 'Forbidden: this API key may not use the service',
    413: HEADINGS_BY_CODE.request_too_large,
    415: NOT_AUDIO,
    429: 'Server busy: too many requests',
    503: 'Server busy: the queue is full',
    504: HEADINGS_BY_CODE.request_timeout,
  };

  function errorHeading(status, code, retryAfter) {
    const heading = HEADINGS_BY_CODE[code] || HEADINGS_BY_STATUS[status] ||
      (status >= 500 ? `The server failed (HTTP ${status})` : `The server refused the request (HTTP ${status})`);
    return retryAfter ? `${heading}, retry after ${retryAfter} s` : heading;
  }

  function showError(heading, message, detail) {
    ui.errorHeading.textContent = heading;
    ui.errorMessage.textContent = message;
    ui.errorDetail.textContent = detail || '';
    showOnly(ui.errorBox);
    setStatus(`Failed: ${heading}`);
    revealOutput();
  }

  // The API's error body is {"error": {"message", "type", "param", "code"}}; anything else is shown as text.
  function parseError(xhr) {
    try {
      const body = JSON.parse(xhr.responseText);
      if (body && body.error && typeof body.error.message === 'string') return body.error;
    } catch (_) { /* not JSON: fall through to the raw text */ }
    const text = (xhr.responseText || '').trim().slice(0, 500);
    return { message: text || xhr.statusText || `HTTP ${xhr.status}`, type: null, code: null };
  }

  function showHttpError(xhr) {
    const error = parseError(xhr);
    const retryAfter = xhr.getResponseHeader('Retry-After');
    const detail = [`HTTP ${xhr.status}`, error.type && `type: ${error.type}`, error.code && `code: ${error.code}`,
      error.param && `param: ${error.param}`].filter(Boolean).join(' · ');
    showError(errorHeading(xhr.status, error.code, retryAfter), error.message, detail);
    if (xhr.status === 401 || xhr.status === 403) {
      revealKeyField();
      ui.apiKey.focus();
    }
  }

  // ---- API key ----------------------------------------------------------------------------

  function revealKeyField() {
    ui.keyField.hidden = false;
  }

  function authHeaders() {
    const key = ui.apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  // The key is kept in sessionStorage (this tab only, gone when it closes) and only if the user asks.
  function rememberKey() {
    if (ui.rememberKey.checked && ui.apiKey.value.trim()) sessionStorage.setItem(KEY_STORAGE, ui.apiKey.value.trim());
    else sessionStorage.removeItem(KEY_STORAGE);
  }

  async function loadModel() {
    try {
      const response = await fetch('v1/models', { headers: authHeaders() });
      if (response.status === 401 || response.status === 403) {
        revealKeyField();
        ui.modelLine.textContent = 'This server requires an API key: enter it below.';
        return;
      }
      if (!response.ok) {
        ui.modelLine.textContent = `The server answered HTTP ${response.status} for its model list.`;
        return;
      }
      const body = await response.json();
      const model = body.data && body.data[0];
      if (model) {
        state.modelId = model.id;
        ui.modelLine.textContent = `Model: ${model.id}`;
        if (model.capabilities) offerCapabilities(model.capabilities);
      } else {
        ui.modelLine.textContent = 'The server lists no model.';
      }
    } catch (err) {
      ui.modelLine.textContent = `Cannot reach the server: ${err.message}`;
    }
  }

  // The options the model can honour, from /v1/models' capabilities (a server that lists none gets every option):
  // English-only checkpoints neither translate nor take a language other than English, so neither is offered.
  function offerCapabilities(capabilities) {
    const translates = capabilities.tasks.includes('translate');
    ui.translateOption.hidden = !translates;
    ui.form.elements.task[1].disabled = !translates;
    if (!translates && task() === 'translate') {
      ui.form.elements.task[0].checked = true;
      ui.form.dispatchEvent(new Event('change'));
    }
    const names = new Map(LANGUAGES);
    const chosen = ui.language.value;
    ui.language.replaceChildren(new Option('Detect automatically', ''),
      ...capabilities.languages.map((code) => [code, names.get(code) || code])
        .sort((a, b) => a[1].localeCompare(b[1])).map(([code, name]) => new Option(name, code)));
    ui.language.value = capabilities.languages.includes(chosen) ? chosen : '';
    ui.languageField.hidden = !capabilities.multilingual;
    ui.capabilityNote.hidden = capabilities.multilingual;
    ui.capabilityNote.textContent = capabilities.multilingual ? ''
      : 'This model is English-only: it transcribes English speech and does not translate.';
  }

  // ---- choosing audio ---------------------------------------------------------------------

  function chooseAudio(blob, name) {
    state.audio = { blob, name };
    if (state.audioUrl) URL.revokeObjectURL(state.audioUrl);
    state.audioUrl = URL.createObjectURL(blob);
    ui.player.src = state.audioUrl;
    ui.player.hidden = false;
    ui.chosen.textContent = `Chosen: ${name} (${formatBytes(blob.size)})`;
    setStatus(`Ready to ${taskName()}.`);
  }

  function openFilePicker() {
    if (!state.request) ui.fileInput.click();
  }

  ui.dropZone.addEventListener('click', openFilePicker);
  ui.dropZone.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' || event.key === ' ') {
      event.preventDefault();
      openFilePicker();
    }
  });
  ui.dropZone.addEventListener('dragover', (event) => {
    event.preventDefault();
    ui.dropZone.classList.add('dragging');
  });
  ui.dropZone.addEventListener('dragleave', () => ui.dropZone.classList.remove('dragging'));
  ui.dropZone.addEventListener('drop', (event) => {
    event.preventDefault();
    ui.dropZone.classList.remove('dragging');
    const file = event.dataTransfer.files[0];
    if (file) chooseAudio(file, file.name);
  });
  ui.fileInput.addEventListener('change', () => {
    const file = ui.fileInput.files[0];
    if (file) chooseAudio(file, file.name);
    ui.fileInput.value = ''; // choosing the same file again still fires change
  });

  // ---- recording --------------------------------------------------------------------------

  const RECORDING_EXTENSIONS = { 'audio/webm': 'webm', 'audio/ogg': 'ogg', 'audio/mp4': 'm4a' };

  function setUpRecording() {
    if (!window.isSecureContext || !navigator.mediaDevices || !window.MediaRecorder) {
      ui.recordButton.disabled = true;
      ui.recordNote.textContent = window.isSecureContext
        ? 'This browser cannot record audio.'
        : 'Recording needs HTTPS or localhost; upload a file instead.';
      return;
    }
    ui.recordButton.addEventListener('click', () => (state.recorder ? stopRecording() : startRecording()));
  }

  async function startRecording() {
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (err) {
      ui.recordNote.textContent = err.name === 'NotAllowedError'
        ? 'Microphone permission was denied.' : `No microphone: ${err.message}`;
      return;
    }
    const recorder = new MediaRecorder(stream);
    const chunks = [];
    const started = performance.now();
    const ticker = setInterval(() => {
      ui.recordNote.textContent = `Recording… ${formatDuration((performance.now() - started) / 1000)}`;
    }, 500);
    recorder.addEventListener('dataavailable', (event) => chunks.push(event.data));
    recorder.addEventListener('stop', () => {
      stream.getTracks().forEach((track) => track.stop());
      clearInterval(ticker);
      const type = recorder.mimeType.split(';')[0] || 'audio/webm';
      const stamp = new Date().toISOString().slice(11, 19).replace(/:/g, '');
      chooseAudio(new Blob(chunks, { type }), `recording-${stamp}.${RECORDING_EXTENSIONS[type] || 'webm'}`);
      ui.recordNote.textContent = `Recorded ${formatDuration((performance.now() - started) / 1000)}.`;
    });
    recorder.start();
    state.recorder = recorder;
    ui.recordButton.setAttribute('aria-pressed', 'true');
    ui.recordLabel.textContent = 'Stop recording';
    ui.recordNote.textContent = 'Recording… 0:00';
  }

  function stopRecording() {
    state.recorder.stop();
    state.recorder = null;
    ui.recordButton.setAttribute('aria-pressed', 'false');
    ui.recordLabel.textContent = 'Record from microphone';
  }

  // ---- the request ------------------------------------------------------------------------

  function task() {
    return ui.form.elements.task.value;
  }

  function taskName() {
    return task() === 'translate' ? 'translate' : 'transcribe';
  }

  function setBusy(busy) {
    ui.submit.disabled = busy;
    ui.cancel.disabled = !busy;
    ui.dropZone.setAttribute('aria-disabled', String(busy));
  }

  function stopTicker() {
    clearInterval(state.ticker);
    state.ticker = null;
  }

  function startWorkingTicker(started) {
    const verb = task() === 'translate' ? 'Translating' : 'Transcribing';
    const tick = () => setStatus(`${verb}… ${((performance.now() - started) / 1000).toFixed(0)} s`);
    setProgress('indeterminate');
    tick();
    state.ticker = setInterval(tick, 500);
  }

  function buildForm() {
    const data = new FormData();
    data.append('file', state.audio.blob, state.audio.name);
    if (state.modelId) data.append('model', state.modelId);
    if (task() === 'translate') {
      // OpenAI's translations neither stream nor give words: one verbose_json answer with its segments.
      data.append('response_format', 'verbose_json');
    } else {
      // A stream of the text as it is decoded; each delta carries its segments (every output format is built from
      // them here) and its words (for playback).
      data.append('response_format', 'json');
      data.append('stream', 'true');
      data.append('timestamp_granularities[]', 'segment');
      data.append('timestamp_granularities[]', 'word');
    }
    if (ui.language.value && !ui.languageField.hidden) data.append('language', ui.language.value);
    if (ui.prompt.value.trim()) data.append('prompt', ui.prompt.value.trim());
    return data;
  }

  function finishRequest() {
    stopTicker();
    setProgress('idle');
    setBusy(false);
    state.request = null;
    state.streaming = false;
  }

  // The server-sent events received so far: complete events past `state.consumed` in the response.
  function takeEvents(xhr) {
    const events = [];
    let end;
    while ((end = xhr.responseText.indexOf('\n\n', state.consumed)) >= 0) {
      const block = xhr.responseText.slice(state.consumed, end);
      state.consumed = end + 2;
      const data = block.split('\n').filter((line) => line.startsWith('data: ')).map((line) => line.slice(6)).join('\n');
      if (data) events.push(JSON.parse(data));
    }
    return events;
  }

  function onDelta(event) {
    const result = state.result;
    result.text += event.delta;
    for (const s of event.segments || []) {
      result.segments.push({ start: Number(s.start) || 0, end: Number(s.end) || 0, text: String(s.text || '') });
    }
    result.words.push(...(event.words || []).map((w) => ({ word: String(w.word), start: Number(w.start),
      end: Number(w.end) })));
    renderResult();
    if (result.segments.length === event.segments?.length) revealOutput(); // the first words
  }

  function onDone(event, started) {
    state.answered = true;
    const result = state.result;
    result.text = event.text;
    const code = event.languages && event.languages[0] && event.languages[0].code;
    const language = code && (LANGUAGES.find(([known]) => known === code) || [code, code])[1];
    renderResult();
    setActionsEnabled(true);
    const took = (performance.now() - started) / 1000;
    const duration = Number.isFinite(ui.player.duration) ? ui.player.duration : null;
    ui.meta.textContent = [language && `Language: ${language}`,
      duration !== null && `${formatDuration(duration)} of audio`, `took ${took.toFixed(1)} s`].filter(Boolean).join(' · ');
    revealOutput();
    const count = result.segments.length;
    setStatus(`Done: ${count} segment${count === 1 ? '' : 's'} in ${took.toFixed(1)} s.`);
  }

  // The stream's error event: the request failed after the server had started answering.
  function onStreamError(event) {
    state.answered = true;
    const error = event.error || {};
    const detail = ['during the stream', error.type && `type: ${error.type}`, error.code && `code: ${error.code}`]
      .filter(Boolean).join(' · ');
    showError(errorHeading(500, error.code, null), error.message || 'The server failed.', detail);
  }

  // A translation's verbose_json answer: all its segments at once, shown as one delta and its done event (its
  // `language` is the output's, English, so none is shown).
  function onAnswer(answer, started) {
    onDelta({ delta: answer.text, segments: answer.segments || [], words: [] });
    onDone({ text: answer.text }, started);
  }

  function readStream(xhr, started) {
    for (const event of takeEvents(xhr)) {
      if (event.type === 'transcript.text.delta') onDelta(event);
      else if (event.type === 'transcript.text.done') onDone(event, started);
      else if (event.type === 'error') onStreamError(event);
    }
  }

  function submit(event) {
    event.preventDefault();
    if (state.request) return;
    if (!state.audio) {
      setStatus('Choose a file or record audio first.');
      ui.dropZone.focus();
      return;
    }
    rememberKey();
    const xhr = new XMLHttpRequest();
    const started = performance.now();
    state.request = xhr;
    state.streaming = true;
    state.answered = false; // a done or error event arrived
    state.consumed = 0;
    state.result = { text: '', segments: [], words: [], baseName: state.audio.name.replace(/\.[^.]+$/, '') || 'transcript' };
    setActionsEnabled(false);
    setBusy(true);
    ui.meta.textContent = '\u00a0';
    showPlaceholder('Waiting for the server…');
    setProgress('determinate', 0);
    setStatus('Uploading… 0%');

    xhr.open('POST', task() === 'translate' ? 'v1/audio/translations' : 'v1/audio/transcriptions');
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener('progress', (e) => {
      if (!e.lengthComputable) return;
      const percent = Math.round((e.loaded / e.total) * 100);
      setProgress('determinate', percent);
      setStatus(`Uploading… ${percent}% (${formatBytes(e.loaded)} of ${formatBytes(e.total)})`);
    });
    // Once the upload is done the server decodes and runs the model: no byte count to show, so show time.
    xhr.upload.addEventListener('load', () => startWorkingTicker(performance.now()));
    // The events are read as they arrive; an answer other than 200 is a plain JSON error.
    const streaming = () => xhr.status === 200 && (xhr.getResponseHeader('Content-Type') || '').startsWith('text/event-stream');
    xhr.addEventListener('progress', () => {
      if (streaming()) readStream(xhr, started);
    });
    xhr.addEventListener('load', () => {
      finishRequest();
      if (xhr.status === 200 && (xhr.getResponseHeader('Content-Type') || '').startsWith('application/json')) {
        onAnswer(JSON.parse(xhr.responseText), started);
        return;
      }
      if (!streaming()) {
        showHttpError(xhr);
        return;
      }
      readStream(xhr, started);
      if (!state.answered) {
        showError('The answer ended early', 'The server closed the stream before the transcript was complete.',
          'A proxy timeout or a restarting server can cut a stream; try again.');
      }
    });
    xhr.addEventListener('error', () => {
      finishRequest();
      showError('No answer from the server',
        'The connection closed before the server answered.',
        'Check the network; a file over the server\'s upload limit or a proxy timeout can also close it.');
    });
    xhr.addEventListener('abort', () => {
      finishRequest();
      showPlaceholder('Cancelled. The transcript appears here.');
      setStatus('Cancelled.');
    });
    xhr.send(buildForm());
  }

  ui.form.addEventListener('submit', (event) => {
    if (live.socket) event.preventDefault();
    else submit(event);
  });
  ui.cancel.addEventListener('click', () => state.request && state.request.abort());

  // ---- live captions ----------------------------------------------------------------------

  const LIVE_RATE = 24000; // the Realtime API's audio/pcm rate
  const LIVE_MAX_QUEUED_BYTES = 2 * 1024 * 1024; // ~16 s of audio the network has not taken: past it, give up
  const live = {
    socket: null,
    stream: null,
    context: null,
    node: null,
    configured: false, // session.updated received: the server reads 24 kHz PCM16 from here on
    waiting: [], // chunks captured before then
    speaking: false, // between speech_started and speech_stopped
    awaitingCommit: false, // the stop's commit is sent, its answer not yet received
    pending: new Set(), // committed turns not yet completed or failed
    turns: new Map(), // item_id -> its caption element
    stopping: false,
    ticker: null,
  };

  function setUpLive() {
    if (!window.isSecureContext || !navigator.mediaDevices || !window.AudioWorkletNode) {
      ui.liveButton.disabled = true;
      ui.liveNote.textContent = window.isSecureContext
        ? 'This browser cannot capture live audio.'
        : 'Live captions need HTTPS or localhost.';
      return;
    }
    ui.liveButton.addEventListener('click', () => (live.socket ? stopLive() : startLive()));
  }

  function base64(buffer) {
    const bytes = new Uint8Array(buffer);
    let text = '';
    for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return btoa(text);
  }

  function sendLive(event) {
    if (live.socket && live.socket.readyState === WebSocket.OPEN) live.socket.send(JSON.stringify(event));
  }

  function sendAudio(buffer) {
    if (live.socket.bufferedAmount > LIVE_MAX_QUEUED_BYTES) {
      stopLive('The connection cannot keep up with the microphone: live captions stopped.');
      return;
    }
    sendLive({ type: 'input_audio_buffer.append', audio: base64(buffer) });
  }

  // A browser cannot put a key in a WebSocket's headers: with a key, the page trades it for a short-lived secret
  // that travels as a subprotocol, as OpenAI's browser clients do.
  async function liveProtocols() {
    if (!ui.apiKey.value.trim()) return ['realtime'];
    const response = await fetch('v1/realtime/client_secrets', {
      method: 'POST',
      headers: { ...authHeaders(), 'Content-Type': 'application/json' },
      body: JSON.stringify({ session: { type: 'transcription' } }),
    });
    if (!response.ok) {
      let error = { message: `HTTP ${response.status}` };
      try { error = (await response.json()).error || error; } catch (_) { /* not JSON */ }
      const failure = new Error(error.message);
      failure.heading = errorHeading(response.status, error.code, response.headers.get('Retry-After'));
      failure.status = response.status;
      throw failure;
    }
    return ['realtime', `openai-insecure-api-key.${(await response.json()).value}`];
  }

  function sessionUpdate() {
    const transcription = { model: state.modelId || 'whisper-1' };
    if (ui.language.value && !ui.languageField.hidden) transcription.language = ui.language.value;
    if (ui.prompt.value.trim()) transcription.prompt = ui.prompt.value.trim();
    return {
      type: 'session.update',
      session: {
        type: 'transcription',
        audio: { input: { format: { type: 'audio/pcm', rate: LIVE_RATE }, transcription, turn_detection: { type: 'server_vad' } } },
      },
    };
  }

  function caption(itemId) {
    let item = live.turns.get(itemId);
    if (!item) {
      item = document.createElement('li');
      item.dataset.itemId = itemId;
      item.className = 'speaking';
      live.turns.set(itemId, item);
      ui.captions.append(item);
      showOnly(ui.captions);
    }
    return item;
  }

  function followCaptions() {
    ui.output.scrollTop = ui.output.scrollHeight;
  }

  function onLiveEvent(event) {
    switch (event.type) {
      case 'session.created':
        sendLive(sessionUpdate());
        break;
      case 'session.updated':
        if (live.configured) break;
        live.configured = true;
        for (const buffer of live.waiting.splice(0)) sendAudio(buffer);
        setStatus('Live: listening.');
        break;
      case 'input_audio_buffer.speech_started':
        live.speaking = true;
        caption(event.item_id);
        followCaptions();
        break;
      case 'input_audio_buffer.speech_stopped':
        live.speaking = false;
        break;
      case 'input_audio_buffer.committed':
        live.awaitingCommit = false;
        live.pending.add(event.item_id);
        caption(event.item_id).className = 'decoding';
        break;
      case 'conversation.item.input_audio_transcription.delta':
        caption(event.item_id).textContent += event.delta;
        followCaptions();
        break;
      case 'conversation.item.input_audio_transcription.completed': {
        live.pending.delete(event.item_id);
        const item = caption(event.item_id);
        item.textContent = event.transcript.trim();
        item.className = 'final';
        if (!item.textContent) item.remove(); // a turn with no words (a cough, a door) leaves no empty line
        const count = ui.captions.querySelectorAll('li.final').length;
        setStatus(`Live: ${count} turn${count === 1 ? '' : 's'} captioned.`);
        followCaptions();
        break;
      }
      case 'conversation.item.input_audio_transcription.failed': {
        live.pending.delete(event.item_id);
        const item = caption(event.item_id);
        item.className = 'failed';
        item.textContent = `(not transcribed: ${(event.error && event.error.message) || 'the server failed'})`;
        break;
      }
      case 'error':
        live.awaitingCommit = false; // a refused commit (nothing to commit) leaves nothing to wait for
        // The session goes on after an error event unless the server closes it, which onclose reports.
        setStatus(`Live: the server says: ${(event.error && event.error.message) || 'error'}`);
        break;
      default:
        break;
    }
    live.checkDone?.();
  }

  async function startCapture() {
    live.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
    // 24 kHz where the browser can: its resampler then does the work, and the worklet passes samples through.
    try {
      live.context = new AudioContext({ sampleRate: LIVE_RATE });
    } catch (_) {
      live.context = new AudioContext();
    }
    await live.context.audioWorklet.addModule('static/live-capture.js');
    live.node = new AudioWorkletNode(live.context, 'pcm16-capture', { numberOfInputs: 1, numberOfOutputs: 1 });
    live.node.port.onmessage = (message) => {
      if (message.data.pcm16) {
        if (live.configured) sendAudio(message.data.pcm16);
        else live.waiting.push(message.data.pcm16);
      } else if (message.data.flushed) {
        live.flushed?.();
      }
    };
    live.context.createMediaStreamSource(live.stream).connect(live.node);
    // Connected to the output so the browser runs it; it writes silence, so nothing is played back.
    live.node.connect(live.context.destination);
  }

  function stopCapture() {
    if (live.stream) live.stream.getTracks().forEach((track) => track.stop());
    if (live.context) live.context.close();
    live.stream = live.context = live.node = null;
  }

  function setLiveBusy(on) {
    ui.liveButton.setAttribute('aria-pressed', String(on));
    ui.liveLabel.textContent = on ? 'Stop live captions' : 'Start live captions';
    ui.submit.disabled = on;
    ui.recordButton.disabled = on || !window.MediaRecorder;
    ui.dropZone.setAttribute('aria-disabled', String(on));
    clearInterval(live.ticker);
    if (on) {
      const started = performance.now();
      const tick = () => { ui.liveNote.textContent = `Live… ${formatDuration((performance.now() - started) / 1000)}`; };
      tick();
      live.ticker = setInterval(tick, 500);
    }
  }

  async function startLive() {
    if (state.request || live.socket) return;
    if (!ui.keyField.hidden && !ui.apiKey.value.trim()) {
      setStatus('Enter the API key first: this server requires one.');
      ui.apiKey.focus();
      return;
    }
    rememberKey();
    Object.assign(live, { configured: false, waiting: [], speaking: false, awaitingCommit: false, stopping: false, problem: null,
      checkDone: null });
    live.pending.clear();
    live.turns.clear();
    ui.captions.replaceChildren();
    showPlaceholder('Speak: captions appear here as you talk.');
    setActionsEnabled(false);
    ui.meta.textContent = '\u00a0';
    setStatus('Live: connecting…');
    let protocols;
    try {
      await startCapture();
      protocols = await liveProtocols();
    } catch (err) {
      stopCapture();
      if (err.heading) {
        showError(err.heading, err.message, `HTTP ${err.status} · POST /v1/realtime/client_secrets`);
      } else {
        const denied = err.name === 'NotAllowedError';
        setStatus(denied ? 'Live: microphone permission was denied.' : `Live: no microphone: ${err.message}`);
      }
      return;
    }
    const url = new URL('v1/realtime?intent=transcription', window.location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    const socket = new WebSocket(url, protocols);
    live.socket = socket;
    setLiveBusy(true);
    let opened = false;
    socket.addEventListener('open', () => { opened = true; });
    socket.addEventListener('message', (message) => {
      if (typeof message.data === 'string') onLiveEvent(JSON.parse(message.data));
    });
    socket.addEventListener('close', (event) => endLive(event, opened));
  }

  // Stops the microphone; the turn being spoken is committed, and the captions of committed turns are awaited
  // (up to 15 s) before the socket closes.
  async function stopLive(problem) {
    if (!live.socket || live.stopping) return;
    live.stopping = true;
    live.problem = problem;
    ui.liveButton.disabled = true;
    setStatus(problem || 'Live: finishing the last turn…');
    if (live.node && live.configured && !problem) {
      await new Promise((resolve) => {
        live.flushed = resolve;
        live.node.port.postMessage('flush');
        setTimeout(resolve, 1000);
      });
      if (live.speaking) {
        live.speaking = false;
        live.awaitingCommit = true;
        sendLive({ type: 'input_audio_buffer.commit' });
      }
    }
    stopCapture();
    const socket = live.socket;
    await new Promise((resolve) => {
      live.checkDone = () => { if (live.pending.size === 0 && !live.awaitingCommit) resolve(); };
      if (problem) resolve();
      else live.checkDone();
      setTimeout(resolve, 15000);
    });
    live.checkDone = null;
    socket.close(1000, 'done');
  }

  function endLive(event, opened) {
    const asked = live.stopping;
    stopCapture();
    clearInterval(live.ticker);
    live.socket = null;
    setLiveBusy(false);
    ui.liveButton.disabled = false;
    const count = ui.captions.querySelectorAll('li.final').length;
    ui.liveNote.textContent = count ? `${count} turn${count === 1 ? '' : 's'} captioned.` : '';
    if (!opened) {
      showError('No live connection', 'The server refused the live connection or could not be reached.',
        'Check the API key and that the server serves /v1/realtime.');
    } else if (!asked) {
      // 1012: the server is restarting (a drain); another replica takes a new connection.
      const why = event.code === 1012 ? 'the server is restarting; start again to reconnect'
        : `the connection closed (code ${event.code}${event.reason ? `: ${event.reason}` : ''})`;
      setStatus(`Live stopped: ${why}.`);
    } else if (!live.problem) {
      setStatus(`Live stopped: ${count} turn${count === 1 ? '' : 's'} captioned.`);
    }
    if (!count && opened) showPlaceholder('No speech was captioned.');
  }

  // ---- using the transcript ---------------------------------------------------------------

  // navigator.clipboard exists only on HTTPS or localhost; a plain-HTTP load balancer needs the old way.
  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    const area = document.createElement('textarea');
    area.value = text;
    area.setAttribute('readonly', '');
    area.className = 'visually-hidden';
    document.body.append(area);
    area.select();
    const copied = document.execCommand('copy');
    area.remove();
    if (!copied) throw new Error('the browser refused');
  }

  ui.copy.addEventListener('click', async () => {
    const text = FORMATTERS[ui.outputFormat.value]();
    try {
      await copyText(text);
      setStatus(`Copied ${text.length.toLocaleString()} characters.`);
    } catch (err) {
      setStatus(`Could not copy: ${err.message}. Select the text and copy it instead.`);
    }
  });

  for (const button of ui.downloads) {
    button.addEventListener('click', () => {
      const format = button.dataset.format;
      const blob = new Blob([FORMATTERS[format]()], { type: `${DOWNLOAD_TYPES[format]};charset=utf-8` });
      const link = document.createElement('a');
      link.href = URL.createObjectURL(blob);
      link.download = `${state.result.baseName}.${format}`;
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 1000);
    });
  }

  ui.outputFormat.addEventListener('change', () => {
    if (state.result) renderResult();
  });

  // ---- start ------------------------------------------------------------------------------

  for (const [code, name] of LANGUAGES) ui.language.add(new Option(name, code));
  // The language chosen is the spoken one for a translation too (detected when none is).
  ui.form.addEventListener('change', (event) => {
    if (event.target.name !== 'task') return;
    ui.submit.textContent = task() === 'translate' ? 'Translate' : 'Transcribe';
  });
  ui.rememberKey.addEventListener('change', rememberKey);
  ui.apiKey.addEventListener('change', () => {
    rememberKey();
    if (!state.modelId) loadModel();
  });
  const savedKey = sessionStorage.getItem(KEY_STORAGE);
  if (savedKey) {
    ui.apiKey.value = savedKey;
    ui.rememberKey.checked = true;
    revealKeyField();
  }
  setUpRecording();
  setUpLive();
  loadModel();
})();
