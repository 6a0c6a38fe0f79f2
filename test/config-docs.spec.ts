// docs/configuration.md is generated from Pulumi.yaml and the stack files (scripts/config-docs.ts): it must be what the
// generator writes now, name every key, and describe exactly the secrets the program reads.
import { strict as assert } from "assert";
import * as fs from "fs";
import * as path from "path";
import * as YAML from "yaml";
import { configurationDocPath, projectKeys, renderConfigurationDoc, repoRoot, secretKeys } from "../scripts/config-docs";

describe("configuration reference (docs/configuration.md)", () => {
    const page = fs.readFileSync(configurationDocPath, "utf8");

    it("is what scripts/config-docs.ts writes from Pulumi.yaml and the stack files (run `npm run docs:config`)", () => {
        assert.equal(page, renderConfigurationDoc(), "docs/configuration.md is out of date: run `npm run docs:config`");
    });

    it("has one row per key Pulumi.yaml declares, in a group, with its allowed values where the key has a range", () => {
        const declared = Object.keys(YAML.parse(fs.readFileSync(path.join(repoRoot, "Pulumi.yaml"), "utf8")).config);
        const keys = projectKeys();
        assert.deepEqual(keys.map((doc) => doc.key), declared);
        for (const doc of keys) {
            assert.ok(doc.group, `${doc.key} sits under a group comment in Pulumi.yaml`);
            assert.ok(doc.description.length > 10, `${doc.key} has a description`);
            assert.match(page, new RegExp(`^\\| \`${doc.key}\` \\|`, "m"));
        }
        const ranged = keys.filter((doc) => ["integer", "array"].includes(YAML.parse(fs.readFileSync(path.join(repoRoot, "Pulumi.yaml"), "utf8")).config[doc.key].type));
        for (const doc of ranged) assert.ok(doc.allowed, `${doc.key}: its Pulumi.yaml description ends with "Allowed: ..."`);
    });

    it("describes exactly the secrets infra/load-config.ts reads", () => {
        const source = fs.readFileSync(path.join(repoRoot, "infra", "load-config.ts"), "utf8");
        const read = [...source.matchAll(/[sS]ecret\("([A-Za-z0-9]+)"\)/g)].map((match) => match[1]).sort();
        assert.deepEqual(Object.keys(secretKeys).sort(), read);
    });

    it("shows each stack's own values", () => {
        assert.match(page, /^\| `gpuInstanceTypes` \|.*\| `g6\.xlarge`, `g6\.2xlarge` \| `g6e\.xlarge` \|$/m);
        assert.match(page, /^\| `aws:region` \| `us-east-1` \| `us-east-1` \|$/m);
    });
});
