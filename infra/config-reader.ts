// Reading stack config: typed values from one pulumi.Config namespace, every problem collected and reported
// together (key, value, what is allowed) in one ConfigError. Knows no key of this stack; load-config.ts does.
import * as pulumi from "@pulumi/pulumi";
import { NodeGroupScaling } from "./config";

/** A bad stack configuration. Pulumi prints a RunError's message alone, without a stack trace. */
export class ConfigError extends pulumi.RunError {
    constructor(readonly problems: readonly string[]) {
        super(
            `The stack configuration is invalid (${problems.length} problem${problems.length === 1 ? "" : "s"}); ` +
                `no resource was declared:\n` +
                problems.map((problem) => `  - ${problem}`).join("\n"),
        );
        this.name = "ConfigError";
    }
}

const show = (value: unknown): string => (typeof value === "string" ? `"${value}"` : JSON.stringify(value));

const cidrPattern = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/;

/** The prefix lengths an IPv4 CIDR setting allows: every length by default. */
export interface PrefixRange {
    min: number;
    max: number;
    /** Why the range is narrower than /0 to /32, for the message. */
    why?: string;
}

/**
 * What is wrong with an IPv4 CIDR block, or undefined: its form, its prefix length, and host bits (`10.0.0.1/16`),
 * which AWS refuses in a VPC's CIDR and which elsewhere mean a range other than the one written.
 */
export function cidrProblem(cidr: string, prefix: PrefixRange = { min: 0, max: 32 }): string | undefined {
    const match = cidrPattern.exec(cidr);
    const octets = match?.slice(1, 5).map(Number) ?? [];
    const length = Number(match?.[5]);
    if (match === null || octets.some((octet) => octet > 255) || length > 32) return "must be an IPv4 CIDR block, e.g. 10.0.0.0/16";
    if (length < prefix.min || length > prefix.max) {
        return `must have a prefix from /${prefix.min} to /${prefix.max}${prefix.why ? ` (${prefix.why})` : ""}, e.g. 10.0.0.0/16`;
    }
    const address = octets.reduce((sum, octet) => sum * 256 + octet, 0);
    const size = 2 ** (32 - length);
    const network = address - (address % size);
    if (network !== address) {
        const dotted = [24, 16, 8, 0].map((shift) => Math.floor(network / 2 ** shift) % 256).join(".");
        return `has host bits set (the block of ${cidr} starts at ${dotted}/${length}): write the network address, ${dotted}/${length}`;
    }
    return undefined;
}

/** Reads typed values from one config namespace and collects what is wrong with them. */
export class ConfigReader {
    readonly problems: string[] = [];
    private readonly config: pulumi.Config;

    constructor(readonly namespace: string) {
        this.config = new pulumi.Config(namespace);
    }

    /** Records a problem: the full key, the bad value and what is allowed. */
    problem(key: string, value: unknown, allowed: string): void {
        this.problems.push(`${this.namespace}:${key} = ${show(value)}: ${allowed}`);
    }

    throwIfProblems(): void {
        if (this.problems.length > 0) throw new ConfigError(this.problems);
    }

    private raw(key: string): string | undefined {
        const value = this.config.get(key);
        if (value === undefined) {
            this.problems.push(`${this.namespace}:${key} is not set: it is required (Pulumi.yaml declares its default)`);
        }
        return value;
    }

    string(key: string, check: { allowed?: readonly string[]; pattern?: RegExp; describe?: string } = {}): string {
        const value = this.raw(key) ?? "";
        if (check.allowed && !check.allowed.includes(value)) {
            this.problem(key, value, `allowed values are ${check.allowed.map(show).join(", ")}`);
        } else if (check.pattern && !check.pattern.test(value)) {
            this.problem(key, value, check.describe ?? `must match ${check.pattern}`);
        }
        return value;
    }

    /** One of the allowed values (a vocabulary of config.ts), typed as such. */
    oneOf<T extends string>(key: string, allowed: readonly T[]): T {
        return this.string(key, { allowed }) as T;
    }

    /** An IPv4 CIDR block (its network address) with a prefix length in the range. */
    cidr(key: string, prefix: PrefixRange): string {
        const value = this.string(key);
        const problem = cidrProblem(value, prefix);
        if (problem) this.problem(key, value, problem);
        return value;
    }

    /** A secret value that may be absent: secrets have no default in Pulumi.yaml. */
    optionalSecret(key: string): pulumi.Output<string> | undefined {
        return this.config.getSecret(key);
    }

    /** A string that may be empty (meaning "not set"); non-empty values must match the pattern. */
    optionalString(key: string, check: { pattern: RegExp; describe: string }): string | undefined {
        const value = this.raw(key) ?? "";
        if (value === "") return undefined;
        if (!check.pattern.test(value)) this.problem(key, value, check.describe);
        return value;
    }

    integer(key: string, range: { min: number; max: number }): number {
        const text = this.raw(key);
        if (text === undefined) return NaN;
        const value = Number(text);
        if (!Number.isInteger(value) || value < range.min || value > range.max) {
            this.problem(key, Number.isNaN(value) ? text : value, `must be an integer from ${range.min} to ${range.max}`);
            return NaN;
        }
        return value;
    }

    boolean(key: string): boolean {
        const text = this.raw(key);
        if (text === undefined) return false;
        if (text !== "true" && text !== "false") this.problem(key, text, "must be true or false");
        return text === "true";
    }

    /** A list of strings; `checkItem` returns what is allowed when an item is bad. */
    stringList(key: string, minItems: number, checkItem: (item: string) => string | undefined): string[] {
        const text = this.raw(key);
        if (text === undefined) return [];
        let value: unknown;
        try {
            value = JSON.parse(text);
        } catch {
            value = text;
        }
        if (!Array.isArray(value) || value.some((item) => typeof item !== "string")) {
            this.problem(key, value, "must be a list of strings");
            return [];
        }
        if (value.length < minItems) this.problem(key, value, `must list at least ${minItems} item(s)`);
        value.forEach((item: string, index: number) => {
            const allowed = checkItem(item);
            if (allowed !== undefined) this.problem(`${key}[${index}]`, item, allowed);
            else if (value.indexOf(item) !== index) this.problem(`${key}[${index}]`, item, "must not repeat an earlier item");
        });
        return value as string[];
    }

    /** `key=value` items as a map: a Kubernetes nodeSelector (label keys and values as the API allows them). */
    labelMap(key: string): Record<string, string> {
        const labelKey = /^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$/;
        const labelValue = /^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$/;
        const items = this.stringList(key, 0, (item) => {
            const [name, value, ...rest] = item.split("=");
            return value !== undefined && rest.length === 0 && labelKey.test(name) && labelValue.test(value)
                ? undefined
                : "must be a node label as key=value, e.g. node-role/monitoring=true";
        });
        return Object.fromEntries(items.map((item) => item.split("=")));
    }

    /** min <= desired <= max, read from `<prefix>MinSize`, `<prefix>DesiredSize`, `<prefix>MaxSize`. */
    scaling(prefix: string, limit: number): NodeGroupScaling {
        const minSize = this.integer(`${prefix}MinSize`, { min: 0, max: limit });
        const desiredSize = this.integer(`${prefix}DesiredSize`, { min: 0, max: limit });
        const maxSize = this.integer(`${prefix}MaxSize`, { min: 1, max: limit });
        if (minSize > maxSize) {
            this.problem(`${prefix}MinSize`, minSize, `must not exceed ${prefix}MaxSize (${maxSize})`);
        } else if (desiredSize < minSize || desiredSize > maxSize) {
            this.problem(`${prefix}DesiredSize`, desiredSize, `must be between ${prefix}MinSize (${minSize}) and ${prefix}MaxSize (${maxSize})`);
        }
        return { minSize, desiredSize, maxSize };
    }
}
