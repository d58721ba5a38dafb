// Numbers as people read them. null (a figure that does not exist) is always "n/a", never 0.

export const NA = "n/a";

function fixed(x, digits) {
  return x.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function number(x) {
  if (x == null || !Number.isFinite(x)) return NA;
  const a = Math.abs(x);
  return fixed(x, a >= 100 ? 0 : a >= 10 ? 1 : 2);
}

export function seconds(s) {
  if (s == null || !Number.isFinite(s)) return NA;
  return s < 1 ? `${fixed(s * 1000, s < 0.01 ? 1 : 0)} ms` : `${fixed(s, 2)} s`;
}

export function percent(ratio) {
  if (ratio == null || !Number.isFinite(ratio)) return NA;
  return `${fixed(ratio * 100, ratio < 0.1 ? 1 : 0)} %`;
}

export function watts(w) {
  if (w == null || !Number.isFinite(w)) return NA;
  return `${number(w)} W`;
}

export function joules(j) {
  if (j == null || !Number.isFinite(j)) return NA;
  return j < 1 ? `${number(j * 1000)} mJ` : `${number(j)} J`;
}

// Where an energy figure comes from, in words, for a tooltip beside the source's name.
export function energySourceHelp(source) {
  if (!source) return "no energy meter";
  if (source.startsWith("measured:nvml")) return "measured: the NVIDIA GPU's energy counter (NVML)";
  if (source.startsWith("measured:rapl")) return "measured: the CPU packages' energy counters (RAPL)";
  if (source.startsWith("estimated:cpu-time")) {
    return "estimated: the engine's CPU time × watts per busy core from the CPU's TDP (no meter readable here)";
  }
  return source.startsWith("estimated") ? "estimated, not measured" : source;
}
