// Every import points one way: the program's modules (index.ts, infra/, scripts/) form no cycle. The graph is
// read from the sources with TypeScript's own import scanner, so type-only imports and re-exports count too.
import { strict as assert } from "assert";
import * as fs from "fs";
import * as path from "path";
import * as ts from "typescript";

const repoRoot = path.resolve(__dirname, "..");

/** The program's TypeScript sources, relative to the repository root. */
function programSources(): string[] {
    const walk = (dir: string): string[] =>
        fs.readdirSync(path.join(repoRoot, dir), { withFileTypes: true }).flatMap((entry) => {
            const relative = path.posix.join(dir, entry.name);
            if (entry.isDirectory()) return walk(relative);
            return entry.name.endsWith(".ts") && !entry.name.endsWith(".d.ts") ? [relative] : [];
        });
    return ["index.ts", ...walk("infra"), ...walk("scripts")].sort();
}

/** The modules `file` imports among `files` (relative specifiers resolved the way Node and TypeScript do). */
function importsOf(file: string, files: ReadonlySet<string>): string[] {
    const source = fs.readFileSync(path.join(repoRoot, file), "utf8");
    const { importedFiles } = ts.preProcessFile(source, true, true);
    const targets = importedFiles
        .map((imported) => imported.fileName)
        .filter((specifier) => specifier.startsWith("."))
        .map((specifier) => {
            const base = path.posix.normalize(path.posix.join(path.posix.dirname(file), specifier));
            return [`${base}.ts`, `${base}/index.ts`, base].find((candidate) => files.has(candidate));
        })
        .filter((target): target is string => target !== undefined);
    return [...new Set(targets)].sort();
}

export type ImportGraph = Map<string, string[]>;

export function importGraph(): ImportGraph {
    const files = programSources();
    const set = new Set(files);
    return new Map(files.map((file) => [file, importsOf(file, set)]));
}

/**
 * The import cycles: one per strongly connected component that has one (Tarjan), each shown as a shortest cycle
 * `a -> b -> ... -> a` followed by every module caught in the component.
 */
export function importCycles(graph: ImportGraph): string[] {
    const index = new Map<string, number>();
    const lowLink = new Map<string, number>();
    const stack: string[] = [];
    const onStack = new Set<string>();
    const components: string[][] = [];
    let next = 0;
    const visit = (node: string): void => {
        index.set(node, next);
        lowLink.set(node, next);
        next++;
        stack.push(node);
        onStack.add(node);
        for (const target of graph.get(node) ?? []) {
            if (!index.has(target)) {
                visit(target);
                lowLink.set(node, Math.min(lowLink.get(node)!, lowLink.get(target)!));
            } else if (onStack.has(target)) {
                lowLink.set(node, Math.min(lowLink.get(node)!, index.get(target)!));
            }
        }
        if (lowLink.get(node) === index.get(node)) {
            const component: string[] = [];
            let member: string;
            do {
                member = stack.pop()!;
                onStack.delete(member);
                component.push(member);
            } while (member !== node);
            if (component.length > 1 || (graph.get(node) ?? []).includes(node)) components.push(component.sort());
        }
    };
    for (const node of graph.keys()) if (!index.has(node)) visit(node);
    return components.map((component) => {
        const cycle = cycleWithin(graph, new Set(component));
        return component.length > cycle.split(" -> ").length - 1 ? `${cycle} (component: ${component.join(", ")})` : cycle;
    });
}

/** A shortest path from the component's first member back to itself, staying inside the component. */
function cycleWithin(graph: ImportGraph, component: ReadonlySet<string>): string {
    const start = [...component][0];
    const previous = new Map<string, string>();
    const queue = [start];
    while (queue.length > 0) {
        const node = queue.shift()!;
        for (const target of graph.get(node) ?? []) {
            if (!component.has(target)) continue;
            if (target === start) {
                const cycle = [node];
                while (cycle[0] !== start) cycle.unshift(previous.get(cycle[0])!);
                return [...cycle, start].join(" -> ");
            }
            if (!previous.has(target)) {
                previous.set(target, node);
                queue.push(target);
            }
        }
    }
    return [...component].join(" <-> ");
}

describe("import graph", () => {
    it("finds a cycle when there is one, and none in a chain (the check itself can fail)", () => {
        const cyclic: ImportGraph = new Map([
            ["a.ts", ["b.ts"]],
            ["b.ts", ["c.ts"]],
            ["c.ts", ["a.ts"]],
            ["d.ts", ["a.ts"]],
        ]);
        assert.deepEqual(importCycles(cyclic), ["a.ts -> b.ts -> c.ts -> a.ts"]);
        assert.deepEqual(importCycles(new Map([["a.ts", ["a.ts"]]])), ["a.ts -> a.ts"]);
        assert.deepEqual(importCycles(new Map([["a.ts", ["b.ts"]], ["b.ts", ["c.ts"]], ["c.ts", []]])), []);
    });

    it("reads the real imports from the sources", () => {
        const graph = importGraph();
        assert.ok(graph.get("index.ts")?.includes("infra/load-config.ts"), JSON.stringify(graph.get("index.ts")));
        assert.ok(graph.has("scripts/render.ts") && graph.get("scripts/render.ts")!.includes("scripts/offline-stack.ts"));
    });

    it("has no import cycle among index.ts, infra/ and scripts/", () => {
        const cycles = importCycles(importGraph());
        assert.deepEqual(cycles, [], `import cycles:\n  ${cycles.join("\n  ")}`);
    });
});
