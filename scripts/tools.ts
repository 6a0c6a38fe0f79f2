// The Python tools the checks run, in one project-local virtualenv (.venv-tools): checkov (test/checkov.spec.ts) and
// kubernetes-validate (scripts/render.ts). Each is pinned with its full closure in its own lock; scripts/python-env.sh
// installs them once, and again only when a lock changes. Never in the system interpreter, never in the service's venv.
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { repoRoot } from "./offline-stack";

export const toolsVenv = ".venv-tools";
export const toolLocks = ["checkov/requirements.txt", "scripts/kubernetes-validate-requirements.txt"];

/** Packages that two locks pin to different versions: one venv can hold only one of them. */
export function conflictingPins(): string[] {
    const pins = new Map<string, Set<string>>();
    for (const lock of toolLocks) {
        for (const line of fs.readFileSync(path.join(repoRoot, lock), "utf8").split("\n")) {
            const match = /^([A-Za-z0-9._-]+)==([^\s;#]+)/.exec(line);
            if (!match) continue;
            const name = match[1].toLowerCase().replace(/[._]/g, "-");
            pins.set(name, new Set([...(pins.get(name) ?? []), match[2]]));
        }
    }
    return [...pins].filter(([, versions]) => versions.size > 1).map(([name, versions]) => `${name} (${[...versions].join(", ")})`);
}

let ready = false;

/** Creates or reuses the tools virtualenv; throws with pip's output when it cannot. */
export function setUpTools(): void {
    if (ready) return;
    const conflicts = conflictingPins();
    if (conflicts.length > 0) throw new Error(`the tool locks (${toolLocks.join(", ")}) pin different versions of: ${conflicts.join("; ")}`);
    const result = spawnSync(path.join(repoRoot, "scripts", "python-env.sh"), [toolsVenv, ...toolLocks], { cwd: repoRoot, encoding: "utf8" });
    if (result.status !== 0) throw new Error(`setting up ${toolsVenv} failed:\n${result.stdout}${result.stderr}`);
    ready = true;
}

/** A program of the tools virtualenv, e.g. `checkov` or `python`. */
export const toolPath = (name: string): string => path.join(repoRoot, toolsVenv, "bin", name);
