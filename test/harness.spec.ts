// The test command itself: what a newcomer meets on a fresh machine. A missing system tool stops it with one message
// naming the tool and how to install it; the Python virtualenv is built once and rebuilt only when a lock changes.
import * as assert from "assert";
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";

const repoRoot = path.resolve(__dirname, "..");

/** A PATH holding only links to the named tools (as found on this machine), so the others are missing. */
function pathWith(tools: string[]): string {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "harness-bin-"));
    for (const tool of tools) {
        const found = spawnSync("/bin/sh", ["-c", `command -v ${tool}`]).stdout.toString().trim();
        if (found) fs.symlinkSync(found, path.join(dir, tool));
    }
    return dir;
}

describe("the test command (scripts/test.sh)", function () {
    it("names every missing system tool once, with the commands that install them, and runs nothing", () => {
        const bin = pathWith(["bash", "dirname", "python3", "ffmpeg"]);
        const result = spawnSync("bash", [path.join(repoRoot, "scripts", "test.sh")], {
            cwd: repoRoot,
            env: { PATH: bin, HOME: os.tmpdir() },
            encoding: "utf8",
        });
        assert.equal(result.status, 1, result.stderr);
        assert.match(result.stderr, /missing system tools/);
        assert.match(result.stderr, /- espeak-ng/);
        assert.match(result.stderr, /- chromium/);
        assert.doesNotMatch(result.stderr, /- ffmpeg|- python3/, "tools that are there are not named");
        assert.match(result.stderr, /Debian\/Ubuntu: sudo apt-get install -y .*espeak-ng.*chromium/);
        assert.match(result.stderr, /macOS: +brew install /);
        assert.doesNotMatch(result.stderr + result.stdout, /Traceback|python-env: setting up|at .*\(.*:\d+:\d+\)/);
    });
});

describe("the project's Python virtualenv (scripts/python-env.sh)", function () {
    this.timeout(300_000);
    const work = fs.mkdtempSync(path.join(os.tmpdir(), "python-env-"));
    const venv = path.join(work, "venv");
    const lock = path.join(work, "requirements.txt");
    const setUp = () =>
        spawnSync("bash", [path.join(repoRoot, "scripts", "python-env.sh"), venv, lock], { cwd: work, encoding: "utf8" });
    // A lock with no packages: the behaviour is the same, and the test needs no index.
    before(() => fs.writeFileSync(lock, "# nothing to install\n"));
    after(() => fs.rmSync(work, { recursive: true, force: true }));

    it("builds the environment from the lock on the first run", () => {
        const result = setUp();
        assert.equal(result.status, 0, result.stderr);
        assert.match(result.stderr, /setting up/);
        assert.ok(fs.existsSync(path.join(venv, "bin", "python")));
    });

    it("reuses it while the lock is unchanged", () => {
        fs.writeFileSync(path.join(venv, "marker"), "");
        const result = setUp();
        assert.equal(result.status, 0, result.stderr);
        assert.doesNotMatch(result.stderr, /setting up/);
        assert.ok(fs.existsSync(path.join(venv, "marker")), "the environment was left as it was");
    });

    it("rebuilds it from scratch when the lock changes", () => {
        fs.appendFileSync(lock, "# a changed lock\n");
        const result = setUp();
        assert.equal(result.status, 0, result.stderr);
        assert.match(result.stderr, /setting up/);
        assert.ok(!fs.existsSync(path.join(venv, "marker")), "nothing from the old environment lingers");
    });

    it("names a requirements file that does not exist", () => {
        const result = spawnSync("bash", [path.join(repoRoot, "scripts", "python-env.sh"), venv, path.join(work, "missing.txt")], {
            encoding: "utf8",
        });
        assert.equal(result.status, 1);
        assert.match(result.stderr, /requirements file .*missing\.txt does not exist/);
    });
});
