// Every relative link in README.md and docs/ resolves: the file exists and, with a #fragment, the target page has
// that heading (GitHub's anchor rules) or an explicit id. Links inside code are not links.
import { strict as assert } from "assert";
import * as fs from "fs";
import * as path from "path";

const repoRoot = path.resolve(__dirname, "..");

function markdownFiles(): string[] {
    const docs = fs.readdirSync(path.join(repoRoot, "docs"), { recursive: true, encoding: "utf8" }).filter((file) => file.endsWith(".md"));
    return ["README.md", ...docs.map((file) => path.join("docs", file))];
}

/** The text outside fenced code blocks and inline code spans. */
function prose(markdown: string): string {
    return markdown.replace(/^(```|~~~)[^\n]*\n[\s\S]*?^\1[^\n]*$/gm, "").replace(/`[^`\n]*`/g, "");
}

/** GitHub's heading anchor: the heading's text lowercased, punctuation dropped, spaces to hyphens, repeats numbered. */
export function githubSlug(heading: string, seen: Map<string, number>): string {
    const text = heading
        .replace(/!?\[([^\]]*)\]\([^)]*\)/g, "$1") // a link's text stays, its target goes
        .replace(/<[^>]+>/g, "")
        .trim()
        .toLowerCase()
        .replace(/[^\p{L}\p{M}\p{N}\p{Pc} -]/gu, "")
        .replace(/ /g, "-");
    const count = seen.get(text) ?? 0;
    seen.set(text, count + 1);
    return count === 0 ? text : `${text}-${count}`;
}

export function anchors(markdown: string): Set<string> {
    const seen = new Map<string, number>();
    const found = new Set<string>();
    const withoutFences = markdown.replace(/^(```|~~~)[^\n]*\n[\s\S]*?^\1[^\n]*$/gm, "");
    for (const match of withoutFences.matchAll(/^#{1,6}[ \t]+(.+?)[ \t#]*$/gm)) found.add(githubSlug(match[1], seen));
    for (const match of markdown.matchAll(/<a\s+(?:id|name)="([^"]+)"/g)) found.add(match[1]);
    return found;
}

/** Link targets: inline links and images, and src/href attributes of HTML tags. */
export function linkTargets(markdown: string): string[] {
    const text = prose(markdown);
    return [
        ...[...text.matchAll(/\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)/g)].map((match) => match[1]),
        ...[...text.matchAll(/\b(?:src|href)="([^"]+)"/g)].map((match) => match[1]),
    ];
}

describe("links in README.md and docs/", () => {
    for (const file of markdownFiles()) {
        it(`${file}: every relative link and anchor resolves`, () => {
            const source = fs.readFileSync(path.join(repoRoot, file), "utf8");
            const broken: string[] = [];
            for (const target of linkTargets(source)) {
                if (/^[a-z][a-z0-9+.-]*:/i.test(target)) continue; // https:, mailto:
                const [filePart, fragment] = target.split("#", 2);
                const resolved = filePart ? path.resolve(path.dirname(path.join(repoRoot, file)), decodeURIComponent(filePart)) : path.join(repoRoot, file);
                if (!resolved.startsWith(repoRoot) || !fs.existsSync(resolved)) {
                    broken.push(`${target}: no such file`);
                    continue;
                }
                if (fragment === undefined) continue;
                if (!resolved.endsWith(".md")) {
                    broken.push(`${target}: an anchor into a file that is not Markdown`);
                    continue;
                }
                if (!anchors(fs.readFileSync(resolved, "utf8")).has(decodeURIComponent(fragment))) broken.push(`${target}: no such heading`);
            }
            assert.deepEqual(broken, [], `${file} has broken links`);
        });
    }

    it("slugs headings as GitHub does", () => {
        const seen = new Map<string, number>();
        assert.equal(githubSlug("### CI/CD setup".replace(/^#+ /, ""), seen), "cicd-setup");
        assert.equal(githubSlug("After the first `pulumi up`: what only a real cluster shows", seen), "after-the-first-pulumi-up-what-only-a-real-cluster-shows");
        assert.equal(githubSlug("11. Teardown", seen), "11-teardown");
        assert.equal(githubSlug("Memory and /tmp", seen), "memory-and-tmp");
        assert.equal(githubSlug("Memory and /tmp", seen), "memory-and-tmp-1");
        assert.equal(githubSlug("GPU nodes (Karpenter's GPU NodePool and EC2NodeClass)", seen), "gpu-nodes-karpenters-gpu-nodepool-and-ec2nodeclass");
        assert.equal(githubSlug("Live: `GET /v1/realtime`", seen), "live-get-v1realtime");
    });

    it("finds links and skips code", () => {
        assert.deepEqual(linkTargets("[a](x.md#y) `[b](no.md)`\n```\n[c](no.md)\n```\n<img src=\"i.png\">"), ["x.md#y", "i.png"]);
    });
});
