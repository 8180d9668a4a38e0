//! Leak-detection statistics: from the outstanding bytes of one (container, call stack)
//! sampled over time, and the mean age of its live allocations, decide whether the stack
//! leaks.
//!
//! Each [`Series`] keeps the points of the last `window` (at most `max_points` of them: the
//! older half is thinned when full). [`Series::assess`] scores it in [0, 1] as the product
//! of five factors, each a linear ramp from 0 ("clearly not") to 1 ("clearly so"), so a
//! clear leak scores exactly 1 and any single failed condition pulls the score down:
//!
//! - **coverage**: at least 8 points (full at 16) and at least 1/4 of the window spanned
//!   (full at 1/2);
//! - **significance**: Mann–Kendall one-sided p-value for an increasing trend, 0 at
//!   p >= 0.05, 1 at p <= 0.001 (log scale);
//! - **materiality**: the growth over the span, the smaller of the Theil–Sen estimate and
//!   the *retained* growth (rise of the floor: second-smallest bytes of the last half minus
//!   that of the first half, extrapolated to the span), compared with 1 KiB (absolute),
//!   with 1 % of the median level (relative), and with the robust noise (1.4826 × MAD of
//!   the Theil–Sen residuals). The floor is what rejects sawtooth batch jobs and churn:
//!   memory that is all freed again does not raise the floor;
//! - **no plateau**: the last half of the span still grows: its Theil–Sen slope compared
//!   with the larger of the slopes of the whole span and of the first half (0 below 1/4,
//!   1 above 0.6), times its own Mann–Kendall significance (0 at p >= 0.1, 1 at
//!   p <= 0.003). A cache that filled up and stopped fails this;
//! - **aging**, only when the mean age is known for at least half of the points: the
//!   smaller of the Theil–Sen slope and the floor-rise rate of the mean age (seconds of age
//!   per second) ramps the factor from 0.5 (0.002 s/s or less) to 1 (0.02 s/s or more), so
//!   ages known not to rise keep the score at or below 0.5. Unknown ages count as 1.
//!
//! Limits: a sawtooth is told from a leak only once the span holds about two cycles
//! (every half must hold a trough), and growth hidden under noise needs a total rise over
//! the window of about 3–5 noise standard deviations.
//!
//! A stack is a suspect when `score >= threshold` (inclusive). Everything is deterministic
//! and at most O(n²) in the number of points kept (bounded by `max_points`).
use std::collections::VecDeque;
use std::time::Duration;

/// Theil–Sen uses every pair up to this many pairs (n <= 200), a fixed pseudo-random
/// sample of this many pairs beyond.
pub const MAX_THEIL_SEN_PAIRS: usize = 20_000;

/// Below this many points the score is 0.
const MIN_POINTS: f64 = 8.0;
/// Points for a full coverage factor.
const FULL_POINTS: f64 = 16.0;
/// Fraction of the window spanned below which the score is 0, and above which coverage is full.
const MIN_COVERAGE: f64 = 0.25;
const FULL_COVERAGE: f64 = 0.5;
/// Mann–Kendall p-values: no credit at or above, full credit at or below.
const P_NONE: f64 = 0.05;
const P_FULL: f64 = 0.001;
/// Growth over the span, in bytes: no credit at or below, full credit at or above.
const GROWTH_BYTES_NONE: f64 = 256.0;
const GROWTH_BYTES_FULL: f64 = 1024.0;
/// Growth over the span relative to the median level.
const GROWTH_LEVEL_NONE: f64 = 0.002;
const GROWTH_LEVEL_FULL: f64 = 0.01;
/// Growth over the span relative to the robust noise (standard deviation estimate).
const GROWTH_NOISE_NONE: f64 = 0.25;
const GROWTH_NOISE_FULL: f64 = 1.0;
/// Slope of the last half relative to the slope of the whole span.
const RECENT_NONE: f64 = 0.25;
const RECENT_FULL: f64 = 0.6;
/// Mann–Kendall p-values of the last half: no credit at or above, full credit at or below.
const RECENT_P_NONE: f64 = 0.1;
const RECENT_P_FULL: f64 = 0.003;
/// Mean-age growth rate, seconds per second.
const AGING_NONE: f64 = 0.002;
const AGING_FULL: f64 = 0.02;
/// Aging factor when ages are known and do not rise.
const AGING_FLOOR: f64 = 0.5;
/// MAD to standard deviation for normal noise.
const MAD_TO_SIGMA: f64 = 1.4826;

#[derive(Clone, Debug)]
pub struct DetectorConfig {
    /// How far back points are kept and analysed.
    pub window: Duration,
    /// Hard bound on the points kept per series (values below 2 count as 2); when reached,
    /// every other point of the older half is dropped.
    pub max_points: usize,
    /// A stack is a suspect when its score is at least this (inclusive).
    pub threshold: f64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(30 * 60),
            max_points: 360,
            threshold: 0.8,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Seconds, monotonic, any origin.
    pub t: f64,
    /// Outstanding bytes of the stack.
    pub bytes: f64,
    /// Mean age in seconds of its live allocations, if known.
    pub mean_age: Option<f64>,
}

/// The recent points of one stack, bounded in time (`window`) and number (`max_points`).
#[derive(Clone, Debug, Default)]
pub struct Series {
    points: VecDeque<Point>,
}

impl Series {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a point, drops the points older than the window (relative to this point), and
    /// thins the older half when more than `max_points` are kept. Points older than the
    /// last one, and points whose `t` or `bytes` is not finite, are ignored; a non-finite
    /// mean age counts as unknown.
    pub fn push(&mut self, point: Point, config: &DetectorConfig) {
        if !point.t.is_finite() || !point.bytes.is_finite() {
            return;
        }
        if self.points.back().is_some_and(|last| point.t < last.t) {
            return;
        }
        self.points.push_back(Point {
            mean_age: point.mean_age.filter(|a| a.is_finite()),
            ..point
        });
        let cutoff = point.t - config.window.as_secs_f64();
        while self.points.front().is_some_and(|p| p.t < cutoff) {
            self.points.pop_front();
        }
        let cap = config.max_points.max(2);
        while self.points.len() > cap {
            let older = self.points.len() / 2;
            if older < 2 {
                // Three points and a cap of two: keep the oldest and the newest.
                self.points.remove(1);
                continue;
            }
            // Keep the oldest point (it carries the coverage) and every other one after it.
            let mut i = 0usize;
            self.points.retain(|_| {
                let keep = i >= older || i.is_multiple_of(2);
                i += 1;
                keep
            });
        }
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    pub fn first(&self) -> Option<&Point> {
        self.points.front()
    }

    pub fn last(&self) -> Option<&Point> {
        self.points.back()
    }

    /// The points kept, oldest first.
    pub fn iter(&self) -> std::collections::vec_deque::Iter<'_, Point> {
        self.points.iter()
    }

    pub fn assess(&self, config: &DetectorConfig) -> Assessment {
        self.analyse(config).0
    }

    /// The assessment and the factors its score is the product of.
    pub fn analyse(&self, config: &DetectorConfig) -> (Assessment, ScoreFactors) {
        let (front, back) = self.points.as_slices();
        if back.is_empty() {
            analyse_points(front, config)
        } else {
            let points: Vec<Point> = self.points.iter().copied().collect();
            analyse_points(&points, config)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Assessment {
    /// Suspicion in [0, 1].
    pub score: f64,
    /// Theil–Sen slope over the points kept (may be <= 0).
    pub growth_bytes_per_second: f64,
    /// `score >= threshold`.
    pub suspect: bool,
    /// Mann–Kendall one-sided p-value for an increasing trend (1 with fewer than 3 points).
    pub trend_p_value: f64,
}

/// The factors of a score (each in [0, 1]; the score is their product). See the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct ScoreFactors {
    /// Enough points, and enough of the window spanned.
    pub coverage: f64,
    /// Mann–Kendall significance of the increasing trend over the span.
    pub significance: f64,
    /// Growth (retained growth included) large against 1 KiB, the level and the noise.
    pub materiality: f64,
    /// The last half still grows (no plateau).
    pub still_growing: f64,
    /// The mean age rises (1 when ages are unknown, 0.5 when they do not rise).
    pub aging: f64,
}

/// Assesses points sorted by time (points going back in time, or with a non-finite `t` or
/// `bytes`, are skipped). The points are taken as they are: nothing is evicted.
pub fn assess_points(points: &[Point], config: &DetectorConfig) -> Assessment {
    analyse_points(points, config).0
}

/// [`assess_points`] with the factors of the score.
pub fn analyse_points(points: &[Point], config: &DetectorConfig) -> (Assessment, ScoreFactors) {
    let mut pts: Vec<Point> = Vec::with_capacity(points.len());
    for p in points {
        if p.t.is_finite() && p.bytes.is_finite() && pts.last().is_none_or(|l| p.t >= l.t) {
            pts.push(*p);
        }
    }
    let n = pts.len();
    if n < 2 {
        let assessment = Assessment {
            score: 0.0,
            growth_bytes_per_second: 0.0,
            suspect: 0.0 >= config.threshold,
            trend_p_value: 1.0,
        };
        return (assessment, ScoreFactors::default());
    }
    let t0 = pts[0].t;
    let span = pts[n - 1].t - t0;
    let xy: Vec<(f64, f64)> = pts.iter().map(|p| (p.t - t0, p.bytes)).collect();
    let bytes: Vec<f64> = pts.iter().map(|p| p.bytes).collect();
    let slope = theil_sen_slope(&xy);
    let (_, p_value) = mann_kendall(&bytes);

    // Coverage: enough points and enough of the window.
    let window = config.window.as_secs_f64();
    let time_coverage = if window > 0.0 { span / window } else { 1.0 };
    let coverage = ramp(n as f64, MIN_POINTS - 1.0, FULL_POINTS)
        * ramp(time_coverage, MIN_COVERAGE, FULL_COVERAGE);

    // Significance of the increasing trend.
    let significance = ramp(-p_value.log10(), -P_NONE.log10(), -P_FULL.log10());

    // Materiality of the growth, retained growth included.
    let mut growth = slope * span;
    if let Some(floor_rate) = floor_rise_rate(&xy) {
        growth = growth.min(floor_rate * span);
    }
    let mut abs_bytes: Vec<f64> = bytes.iter().map(|b| b.abs()).collect();
    let level = median(&mut abs_bytes).max(1.0);
    let mut residuals: Vec<f64> = xy.iter().map(|&(x, y)| y - slope * x).collect();
    let center = median(&mut residuals);
    let mut deviations: Vec<f64> = residuals.iter().map(|r| (r - center).abs()).collect();
    let noise = MAD_TO_SIGMA * median(&mut deviations);
    let noise_ratio = if noise > 0.0 {
        growth / noise
    } else if growth > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    let materiality = ramp(growth, GROWTH_BYTES_NONE, GROWTH_BYTES_FULL)
        * ramp(growth / level, GROWTH_LEVEL_NONE, GROWTH_LEVEL_FULL)
        * ramp(noise_ratio, GROWTH_NOISE_NONE, GROWTH_NOISE_FULL);

    // No plateau: the last half still grows, about as fast as the whole span and the first
    // half, and significantly on its own.
    let still_growing = if slope > 0.0 {
        let start = xy
            .partition_point(|&(x, _)| x < span / 2.0)
            .min(n.saturating_sub(4));
        let (_, recent_p) = mann_kendall(&bytes[start..]);
        let recent_slope = theil_sen_slope(&xy[start..]);
        // The first half (at least 4 points) by the same rule.
        let early_end = start.max(4).min(n);
        let early_slope = theil_sen_slope(&xy[..early_end]).max(slope);
        ramp(recent_slope / early_slope, RECENT_NONE, RECENT_FULL)
            * ramp(
                -recent_p.log10(),
                -RECENT_P_NONE.log10(),
                -RECENT_P_FULL.log10(),
            )
    } else {
        0.0
    };

    // Aging of the live allocations, when known.
    let ages: Vec<(f64, f64)> = pts
        .iter()
        .filter_map(|p| p.mean_age.map(|a| (p.t - t0, a)))
        .collect();
    let aging = if ages.len() as f64 >= MIN_POINTS.max(n as f64 / 2.0) {
        let mut rate = theil_sen_slope(&ages);
        if let Some(floor_rate) = floor_rise_rate(&ages) {
            rate = rate.min(floor_rate);
        }
        AGING_FLOOR + (1.0 - AGING_FLOOR) * ramp(rate, AGING_NONE, AGING_FULL)
    } else {
        1.0
    };

    let factors = ScoreFactors {
        coverage,
        significance,
        materiality,
        still_growing,
        aging,
    };
    let mut score = coverage * significance * materiality * still_growing * aging;
    if !score.is_finite() {
        score = 0.0;
    }
    let score = score.clamp(0.0, 1.0);
    let assessment = Assessment {
        score,
        growth_bytes_per_second: slope,
        suspect: score >= config.threshold,
        trend_p_value: p_value,
    };
    (assessment, factors)
}

/// 0 at or below `lo`, 1 at or above `hi`, linear between; NaN gives 0.
fn ramp(x: f64, lo: f64, hi: f64) -> f64 {
    if x.is_nan() || x <= lo {
        0.0
    } else if x >= hi {
        1.0
    } else {
        (x - lo) / (hi - lo)
    }
}

/// Median (mean of the two middle values for an even count); reorders `values`. 0 if empty.
fn median(values: &mut [f64]) -> f64 {
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    let mid = n / 2;
    let (lower, upper, _) = values.select_nth_unstable_by(mid, f64::total_cmp);
    let upper = *upper;
    if n % 2 == 1 {
        upper
    } else {
        let lower = lower.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lower + upper) / 2.0
    }
}

/// The second-smallest value (the smallest with fewer than 3), so one glitch does not count.
fn low(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (mut first, mut second, mut n) = (f64::INFINITY, f64::INFINITY, 0usize);
    for v in values {
        n += 1;
        if v < first {
            second = first;
            first = v;
        } else if v < second {
            second = v;
        }
    }
    match n {
        0 => None,
        1 | 2 => Some(first),
        _ => Some(second),
    }
}

/// How fast the floor rises: (low of the last half − low of the first half) divided by
/// the time between the starts of the halves. `xy` is sorted by x. What is allocated and
/// freed again (churn, a sawtooth) does not raise the floor; what is retained does.
fn floor_rise_rate(xy: &[(f64, f64)]) -> Option<f64> {
    let (&(x_first, _), &(x_last, _)) = (xy.first()?, xy.last()?);
    let mid = x_first + (x_last - x_first) / 2.0;
    let split = xy.partition_point(|&(x, _)| x < mid);
    if split == 0 || split == xy.len() {
        return None;
    }
    let dx = xy[split].0 - x_first;
    if dx <= 0.0 {
        return None;
    }
    let early = low(xy[..split].iter().map(|&(_, y)| y))?;
    let late = low(xy[split..].iter().map(|&(_, y)| y))?;
    Some((late - early) / dx)
}

/// SplitMix64: a fixed pseudo-random sequence for sampling pairs deterministically.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// Theil–Sen slope: the median of the slopes of all pairs of points (pairs with equal x,
/// or a non-finite slope, are skipped). Beyond [`MAX_THEIL_SEN_PAIRS`] pairs (n > 200), a
/// fixed pseudo-random sample of that many pairs is used, so the result is deterministic
/// and the work bounded. The points need not be sorted. 0 when no pair qualifies.
pub fn theil_sen_slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len();
    if n < 2 {
        return 0.0;
    }
    let pairs = n * (n - 1) / 2;
    let mut slopes = Vec::with_capacity(pairs.min(MAX_THEIL_SEN_PAIRS));
    let mut add = |i: usize, j: usize| {
        let (xi, yi) = points[i];
        let (xj, yj) = points[j];
        let dx = xj - xi;
        if dx != 0.0 {
            let s = (yj - yi) / dx;
            if s.is_finite() {
                slopes.push(s);
            }
        }
    };
    if pairs <= MAX_THEIL_SEN_PAIRS {
        for i in 0..n {
            for j in i + 1..n {
                add(i, j);
            }
        }
    } else {
        let mut rng = SplitMix(0x6d65_6d74_7261_6365);
        for _ in 0..MAX_THEIL_SEN_PAIRS {
            let i = rng.below(n);
            let j = (i + 1 + rng.below(n - 1)) % n;
            add(i, j);
        }
    }
    median(&mut slopes)
}

/// Mann–Kendall test for an increasing trend of `values` (in time order): the S statistic
/// (concordant minus discordant pairs) and the one-sided p-value, from the normal
/// approximation with tie correction and continuity correction. With fewer than 3 values
/// the p-value is 1 (no evidence); with all values tied it is 0.5. NaN compares as a tie.
pub fn mann_kendall(values: &[f64]) -> (i64, f64) {
    let n = values.len();
    let mut s: i64 = 0;
    for (i, &a) in values.iter().enumerate() {
        for &b in &values[i + 1..] {
            if b > a {
                s += 1;
            } else if b < a {
                s -= 1;
            }
        }
    }
    if n < 3 {
        return (s, 1.0);
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    let term = |t: f64| t * (t - 1.0) * (2.0 * t + 5.0);
    let mut ties = 0.0;
    let mut run = 1usize;
    for k in 1..=n {
        if k < n && sorted[k] == sorted[k - 1] {
            run += 1;
        } else {
            ties += term(run as f64);
            run = 1;
        }
    }
    let variance = (term(n as f64) - ties) / 18.0;
    if variance <= 0.0 {
        return (s, 0.5);
    }
    let z = match s {
        0 => 0.0,
        s if s > 0 => (s - 1) as f64 / variance.sqrt(),
        s => (s + 1) as f64 / variance.sqrt(),
    };
    (s, normal_upper_tail(z))
}

/// P(Z > z) for a standard normal Z.
fn normal_upper_tail(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// Complementary error function, Chebyshev fit with relative error below 1.2e-7.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Xorshift64* for deterministic noise.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        }
        fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// Uniform in [0, 1).
        fn unit(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
        /// Uniform in [-a, a).
        fn sym(&mut self, a: f64) -> f64 {
            (self.unit() * 2.0 - 1.0) * a
        }
    }

    const KB: f64 = 1024.0;
    const MB: f64 = 1024.0 * 1024.0;

    fn config(window_s: u64) -> DetectorConfig {
        DetectorConfig {
            window: Duration::from_secs(window_s),
            ..DetectorConfig::default()
        }
    }

    fn pt(t: f64, bytes: f64, mean_age: Option<f64>) -> Point {
        Point { t, bytes, mean_age }
    }

    /// Feeds `shape(t)` at `t = k·step` for k = 0, 1, … while `t <= end` into a series,
    /// assessing after every fifth point and the last one; returns the series and the
    /// (t, assessment) pairs.
    fn run(
        cfg: &DetectorConfig,
        end: f64,
        step: f64,
        mut shape: impl FnMut(f64) -> Option<Point>,
    ) -> (Series, Vec<(f64, Assessment)>) {
        let mut series = Series::new();
        let mut out = Vec::new();
        let steps = (end / step + 1e-9).floor() as u32;
        for k in 0..=steps {
            let t = f64::from(k) * step;
            let Some(p) = shape(t) else { continue };
            series.push(p, cfg);
            if k % 5 == 0 || k == steps {
                let a = series.assess(cfg);
                assert!((0.0..=1.0).contains(&a.score), "score {a:?}");
                assert_eq!(a.suspect, a.score >= cfg.threshold);
                out.push((t, a));
            }
        }
        (series, out)
    }

    fn max_score_from(history: &[(f64, Assessment)], from: f64) -> f64 {
        history
            .iter()
            .filter(|(t, _)| *t >= from)
            .map(|(_, a)| a.score)
            .fold(0.0, f64::max)
    }

    fn min_score_from(history: &[(f64, Assessment)], from: f64) -> f64 {
        history
            .iter()
            .filter(|(t, _)| *t >= from)
            .map(|(_, a)| a.score)
            .fold(1.0, f64::min)
    }

    #[test]
    fn steady_leak_alarms() {
        let cfg = config(300);
        // Noise-free: 2 KiB/s on top of 1 MiB; ages of a leak that began at t = -100.
        let (_, history) = run(&cfg, 450.0, 1.0, |t| {
            Some(pt(t, MB + 2.0 * KB * t, Some((t + 100.0) / 2.0)))
        });
        let last = history.last().unwrap().1;
        assert!(last.suspect, "{last:?}");
        assert!(
            (last.growth_bytes_per_second - 2.0 * KB).abs() < 1e-6,
            "{last:?}"
        );
        assert!(last.trend_p_value < 1e-6, "{last:?}");
        assert!(min_score_from(&history, 300.0) >= 0.8);

        // With noise of ±20 KiB on the bytes and ±2 s on the ages.
        let mut rng = Rng::new(1);
        let (_, history) = run(&cfg, 450.0, 1.0, |t| {
            let bytes = MB + 2.0 * KB * t + rng.sym(20.0 * KB);
            let age = (t + 100.0) / 2.0 + rng.sym(2.0);
            Some(pt(t, bytes, Some(age)))
        });
        assert!(min_score_from(&history, 300.0) >= 0.8);
        let last = history.last().unwrap().1;
        assert!(
            (last.growth_bytes_per_second / (2.0 * KB) - 1.0).abs() < 0.05,
            "{last:?}"
        );

        // Ages unknown: not penalised.
        let (_, history) = run(&cfg, 450.0, 1.0, |t| Some(pt(t, MB + 2.0 * KB * t, None)));
        assert!(min_score_from(&history, 300.0) >= 0.8);
    }

    /// Churn: `live` allocations of 1 KiB, about 50 ± 50 live, each a few seconds old; a leak
    /// of one 1 KiB allocation a second under it.
    fn churn_leak(rng: &mut Rng, t: f64, leak_per_s: f64, base: f64) -> Point {
        let churn_count = 50.0 + rng.sym(50.0);
        let leaked_count = leak_per_s * t;
        let bytes = base + churn_count * KB + leaked_count * KB;
        let churn_age = 2.5 + rng.sym(0.5);
        let leaked_age = t / 2.0;
        let base_count = base / KB;
        let base_age = 2.5;
        let count = churn_count + leaked_count + base_count;
        let age = if count > 0.0 {
            (churn_count * churn_age + leaked_count * leaked_age + base_count * base_age) / count
        } else {
            0.0
        };
        pt(t, bytes, Some(age))
    }

    #[test]
    fn slow_leak_under_churn_alarms() {
        let cfg = config(300);
        for seed in 0..5 {
            let mut rng = Rng::new(seed);
            // +1 KiB/s under ±50 KiB of churn, on 2 MiB of short-lived allocations.
            let (_, history) = run(&cfg, 450.0, 1.0, |t| {
                Some(churn_leak(&mut rng, t, 1.0, 2.0 * MB))
            });
            let last = history.last().unwrap().1;
            assert!(last.suspect, "seed {seed}: {last:?}");
            assert!(
                (last.growth_bytes_per_second / KB - 1.0).abs() < 0.25,
                "seed {seed}: {last:?}"
            );
            assert!(min_score_from(&history, 400.0) >= 0.8, "seed {seed}");
        }
    }

    #[test]
    fn leak_after_quiet_warm_up_alarms_once_window_slides_past() {
        let cfg = config(300);
        let start = 900.0;
        let mut rng = Rng::new(7);
        let (_, history) = run(&cfg, start + 400.0, 1.0, |t| {
            let leaked = (t - start).max(0.0) * 2.0; // KiB, one 1 KiB block per 0.5 s
            let base = 1000.0; // KiB of short-lived blocks
            let bytes = (base + leaked) * KB + rng.sym(5.0 * KB);
            let age = (base * (3.0 + rng.sym(0.5)) + leaked * (t - start).max(0.0) / 2.0)
                / (base + leaked);
            Some(pt(t, bytes, Some(age)))
        });
        let quiet = history
            .iter()
            .filter(|(t, _)| *t <= start)
            .map(|(_, a)| a.score)
            .fold(0.0, f64::max);
        assert!(quiet < 0.8, "quiet part scored {quiet}");
        assert!(min_score_from(&history, start + 300.0) >= 0.8);
        let at_start = history.iter().find(|(t, _)| *t >= start).unwrap().1.score;
        let at_end = history.last().unwrap().1.score;
        assert!(at_end > at_start, "{at_start} -> {at_end}");
    }

    #[test]
    fn warm_up_then_plateau_does_not_alarm() {
        let cfg = config(300);
        for (seed, with_ages) in [(1, true), (2, false), (3, true)] {
            let mut rng = Rng::new(seed);
            // A cache filling to 20 MiB over the first 100 s, then flat within ±0.5 %;
            // its entries never leave, so their mean age keeps rising.
            let (_, history) = run(&cfg, 700.0, 1.0, |t| {
                let fill = (t / 100.0).min(1.0);
                let bytes = 20.0 * MB * fill * (1.0 + rng.sym(0.005));
                let age = if t < 100.0 { t / 2.0 } else { t - 50.0 };
                Some(pt(t, bytes, with_ages.then_some(age)))
            });
            let worst = max_score_from(&history, 300.0);
            assert!(worst < 0.8, "seed {seed}: {worst}");
            // It did look like growth while the cache filled: the score is not trivially 0.
            assert!(history.iter().any(|(_, a)| a.score > 0.0));
        }
    }

    #[test]
    fn steady_churn_does_not_alarm() {
        let cfg = config(300);
        for seed in 0..6 {
            for with_ages in [true, false] {
                let mut rng = Rng::new(100 + seed);
                let (_, history) = run(&cfg, 600.0, 1.0, |t| {
                    let bytes = 5.0 * MB + rng.sym(200.0 * KB);
                    let age = 2.0 + rng.sym(0.5);
                    Some(pt(t, bytes, with_ages.then_some(age)))
                });
                let worst = max_score_from(&history, 0.0);
                assert!(worst < 0.8, "seed {seed} ages {with_ages}: {worst}");
            }
        }
    }

    #[test]
    fn sawtooth_batch_job_does_not_alarm() {
        let cfg = config(300);
        // Grows for a cycle, then all freed; five cycles per window (from t = 0 on), or three
        // (once the window is full), with or without ages, starting at any phase.
        for (seed, cycle, from, with_ages) in [
            (1, 60.0, 0.0, true),
            (2, 60.0, 0.0, false),
            (3, 100.0, 300.0, true),
            (4, 100.0, 300.0, false),
        ] {
            let mut rng = Rng::new(seed);
            let offset = rng.unit() * cycle;
            let (_, history) = run(&cfg, 900.0, 1.0, |t| {
                let phase = (t + offset) % cycle;
                let bytes = (6.0 * MB * phase / cycle + rng.sym(KB)).max(0.0);
                Some(pt(t, bytes, with_ages.then_some(phase / 2.0)))
            });
            let worst = max_score_from(&history, from);
            assert!(worst < 0.8, "seed {seed}: {worst}");
            // The trend test alone is fooled by the sawtooth; the floor is what rejects it.
            assert!(history.iter().any(|(_, a)| a.trend_p_value < 0.05));
        }
    }

    #[test]
    fn too_few_points_is_not_suspect() {
        let cfg = config(300);
        // Seven points of a steep leak over the whole window.
        let (series, history) = run(&cfg, 300.0, 50.0, |t| Some(pt(t, MB + 10.0 * KB * t, None)));
        assert_eq!(series.len(), 7);
        let last = history.last().unwrap().1;
        assert!(!last.suspect && last.score == 0.0, "{last:?}");
        assert!(last.growth_bytes_per_second > 0.0);

        // Many points, but a fifth of the window.
        let (series, history) = run(&cfg, 60.0, 0.2, |t| Some(pt(t, MB + 10.0 * KB * t, None)));
        assert!(series.len() > 200);
        let last = history.last().unwrap().1;
        assert!(!last.suspect && last.score < 0.1, "{last:?}");
        // The same leak over enough of the window is a suspect.
        let (_, history) = run(&cfg, 200.0, 1.0, |t| Some(pt(t, MB + 10.0 * KB * t, None)));
        assert!(history.last().unwrap().1.suspect);

        // Empty and single-point series.
        let series = Series::new();
        assert!(series.is_empty());
        let a = series.assess(&cfg);
        assert!(!a.suspect && a.score == 0.0 && a.trend_p_value == 1.0);
    }

    #[test]
    fn missing_points_and_uneven_timestamps_still_detect() {
        let cfg = config(300);
        let mut rng = Rng::new(42);
        let mut series = Series::new();
        let mut t = 0.0;
        let mut pushed = 0;
        let mut intervals = 0;
        while t < 500.0 {
            t += 1.0 + rng.sym(0.3);
            intervals += 1;
            if rng.unit() < 0.3 {
                continue; // interval skipped
            }
            let bytes = MB + 3.0 * KB * t + rng.sym(30.0 * KB);
            series.push(pt(t, bytes, Some(t / 2.0 + rng.sym(1.0))), &cfg);
            pushed += 1;
        }
        assert!(pushed < intervals * 8 / 10, "{pushed} of {intervals}");
        let a = series.assess(&cfg);
        assert!(a.suspect, "{a:?}");
        assert!(
            (a.growth_bytes_per_second / (3.0 * KB) - 1.0).abs() < 0.1,
            "{a:?}"
        );
    }

    #[test]
    fn single_huge_spike_does_not_alarm() {
        let cfg = config(300);
        for spike_at in [10.0, 150.0, 280.0, 295.0, 420.0] {
            let mut rng = Rng::new(spike_at as u64);
            let (_, history) = run(&cfg, 450.0, 1.0, |t| {
                let spike = if t == spike_at { 500.0 * MB } else { 0.0 };
                Some(pt(t, 3.0 * MB + rng.sym(2.0 * KB) + spike, Some(4.0)))
            });
            let worst = max_score_from(&history, 0.0);
            assert!(worst < 0.8, "spike at {spike_at}: {worst}");
            // Least squares would call the spike a trend; Theil–Sen does not.
            let at_spike = history.iter().find(|(t, _)| *t == spike_at).unwrap().1;
            assert!(
                at_spike.growth_bytes_per_second.abs() < 100.0,
                "{at_spike:?}"
            );
        }
    }

    #[test]
    fn theil_sen_known_values() {
        assert_eq!(theil_sen_slope(&[]), 0.0);
        assert_eq!(theil_sen_slope(&[(1.0, 5.0)]), 0.0);
        assert_eq!(theil_sen_slope(&[(1.0, 5.0), (1.0, 7.0)]), 0.0);
        // Slopes 1, 2, 3: median 2.
        assert_eq!(theil_sen_slope(&[(0.0, 0.0), (1.0, 1.0), (2.0, 4.0)]), 2.0);
        // y = 2x + 1 and one outlier: slopes 2 (×6), 24.75, 32.33, 47.5, 93; median 2.
        let pts = [(0.0, 1.0), (1.0, 3.0), (2.0, 5.0), (3.0, 7.0), (4.0, 100.0)];
        assert_eq!(theil_sen_slope(&pts), 2.0);
        // Six slopes: 1, 3, 6/4, 4, 5/3, -3 → sorted -3, 1, 1.5, 5/3, 3, 4 → (1.5 + 5/3) / 2.
        let pts = [(0.0, 0.0), (1.0, 1.0), (3.0, 9.0), (4.0, 6.0)];
        assert!((theil_sen_slope(&pts) - 19.0 / 12.0).abs() < 1e-12);
        // Order does not matter.
        let pts = [(3.0, 9.0), (0.0, 0.0), (4.0, 6.0), (1.0, 1.0)];
        assert!((theil_sen_slope(&pts) - 19.0 / 12.0).abs() < 1e-12);
        // Sampled pairs (n > 200): an exact line still gives its slope; deterministic.
        let line: Vec<(f64, f64)> = (0..1000)
            .map(|i| (f64::from(i), 3.0 * f64::from(i) + 2.0))
            .collect();
        assert_eq!(theil_sen_slope(&line), 3.0);
        let mut rng = Rng::new(5);
        let noisy: Vec<(f64, f64)> = (0..1000)
            .map(|i| (f64::from(i), -0.5 * f64::from(i) + rng.sym(20.0)))
            .collect();
        let s = theil_sen_slope(&noisy);
        assert!((s + 0.5).abs() < 0.02, "{s}");
        assert_eq!(s, theil_sen_slope(&noisy));
    }

    #[test]
    fn mann_kendall_known_values() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        let (s, p) = mann_kendall(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(s, 10);
        // var = 5·4·15/18, z = 9/√var = 2.2045.
        assert!(close(p, 0.013_743_168), "{p}");
        let (s, p) = mann_kendall(&[5.0, 4.0, 3.0, 2.0, 1.0]);
        assert_eq!(s, -10);
        assert!(close(p, 0.986_256_832), "{p}");
        // One tie of two: var = (4·3·13 − 2·1·9)/18, z = 4/√var.
        let (s, p) = mann_kendall(&[1.0, 2.0, 2.0, 3.0]);
        assert_eq!(s, 5);
        assert!(close(p, 0.074_280_887), "{p}");
        let (s, p) = mann_kendall(&[3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]);
        assert_eq!(s, 11);
        assert!(close(p, 0.106_243_223), "{p}");
        // Short and flat inputs.
        assert_eq!(mann_kendall(&[]), (0, 1.0));
        assert_eq!(mann_kendall(&[1.0, 2.0]), (1, 1.0));
        assert_eq!(mann_kendall(&[2.0, 2.0, 2.0, 2.0]), (0, 0.5));
    }

    #[test]
    fn max_points_is_enforced_and_leak_still_detected() {
        let cfg = DetectorConfig {
            window: Duration::from_secs(600),
            max_points: 50,
            threshold: 0.8,
        };
        let mut rng = Rng::new(9);
        let mut series = Series::new();
        for i in 0..500 {
            let t = f64::from(i);
            let bytes = MB + KB * t + rng.sym(10.0 * KB);
            series.push(pt(t, bytes, Some(t / 2.0)), &cfg);
            assert!(series.len() <= 50);
        }
        assert!(series.len() >= 25, "{}", series.len());
        // The oldest point is kept, so the coverage is kept.
        assert_eq!(series.first().unwrap().t, 0.0);
        assert_eq!(series.last().unwrap().t, 499.0);
        assert!(
            series
                .iter()
                .zip(series.iter().skip(1))
                .all(|(a, b)| a.t < b.t)
        );
        let a = series.assess(&cfg);
        assert!(a.suspect, "{a:?}");
        assert!((a.growth_bytes_per_second / KB - 1.0).abs() < 0.1, "{a:?}");

        // A degenerate bound still bounds.
        let tiny = DetectorConfig {
            max_points: 0,
            ..cfg.clone()
        };
        let mut series = Series::new();
        for i in 0..20 {
            series.push(pt(f64::from(i), 1.0, None), &tiny);
        }
        assert_eq!(series.len(), 2);
        assert_eq!(series.last().unwrap().t, 19.0);
    }

    #[test]
    fn window_eviction() {
        let cfg = config(100);
        let mut series = Series::new();
        for i in 0..=1000 {
            series.push(pt(f64::from(i) * 0.5, 1.0, None), &cfg);
        }
        let last = series.last().unwrap().t;
        assert_eq!(last, 500.0);
        assert_eq!(series.first().unwrap().t, 400.0);
        assert_eq!(series.len(), 201);
        assert!(series.iter().all(|p| p.t >= last - 100.0));

        // A gap longer than the window leaves only the new point.
        series.push(pt(1000.0, 2.0, None), &cfg);
        assert_eq!(series.len(), 1);
    }

    #[test]
    fn older_points_are_ignored() {
        let cfg = config(100);
        let mut series = Series::new();
        series.push(pt(10.0, 1.0, None), &cfg);
        series.push(pt(5.0, 2.0, None), &cfg);
        assert_eq!(series.len(), 1);
        assert_eq!(series.last().unwrap().bytes, 1.0);
        // Equal time is accepted; non-finite values are not.
        series.push(pt(10.0, 3.0, Some(f64::NAN)), &cfg);
        series.push(pt(11.0, f64::NAN, None), &cfg);
        series.push(pt(f64::INFINITY, 1.0, None), &cfg);
        assert_eq!(series.len(), 2);
        assert_eq!(*series.last().unwrap(), pt(10.0, 3.0, None));
        // assess_points skips points going back in time too.
        let points = [pt(0.0, 0.0, None), pt(-5.0, 9e9, None), pt(1.0, 1.0, None)];
        let a = assess_points(&points, &cfg);
        assert_eq!(a.growth_bytes_per_second, 1.0);
    }

    #[test]
    fn ages_that_do_not_rise_veto_growth_unknown_ages_do_not() {
        let cfg = config(300);
        let mut rng = Rng::new(11);
        // Bytes grow steadily but the live allocations stay young (say, a buffer reallocated
        // ever larger): not a suspect.
        let (_, history) = run(&cfg, 450.0, 1.0, |t| {
            Some(pt(t, MB + 2.0 * KB * t, Some(3.0 + rng.sym(0.2))))
        });
        let young = max_score_from(&history, 0.0);
        assert!(young <= AGING_FLOOR + 1e-12, "{young}");
        // The same bytes with ages unknown, or known for too few points, are a suspect.
        let (_, history) = run(&cfg, 450.0, 1.0, |t| Some(pt(t, MB + 2.0 * KB * t, None)));
        assert!(min_score_from(&history, 300.0) >= 0.8);
        let (_, history) = run(&cfg, 450.0, 1.0, |t| {
            let age = (t % 3.0 == 0.0).then_some(3.0);
            Some(pt(t, MB + 2.0 * KB * t, age))
        });
        assert!(min_score_from(&history, 300.0) >= 0.8);
    }

    #[test]
    fn suspect_is_score_at_least_threshold() {
        let mut cfg = config(300);
        let (series, _) = run(&cfg, 400.0, 1.0, |t| {
            Some(pt(t, 4.0 * KB * t, Some(t / 2.0)))
        });
        let (a, factors) = series.analyse(&cfg);
        assert_eq!(a.score, 1.0, "{factors:?}");
        cfg.threshold = 1.0;
        assert!(series.assess(&cfg).suspect);
        cfg.threshold = 1.0 + 1e-9;
        assert!(!series.assess(&cfg).suspect);
    }

    #[test]
    fn rejections_come_from_the_intended_factor() {
        let cfg = config(300);
        // Plateau: rejected by "still growing".
        let (series, _) = run(&cfg, 300.0, 1.0, |t| {
            Some(pt(t, 20.0 * MB * (t / 100.0).min(1.0), None))
        });
        let (_, f) = series.analyse(&cfg);
        assert!(f.still_growing < 0.2 && f.significance == 1.0, "{f:?}");
        // Sawtooth: rejected by materiality (the floor does not rise) and aging.
        let (series, _) = run(&cfg, 400.0, 1.0, |t| {
            let phase = t % 60.0;
            Some(pt(t, 100.0 * KB * phase, Some(phase / 2.0)))
        });
        let (_, f) = series.analyse(&cfg);
        assert!(f.materiality < 0.2 && f.aging == AGING_FLOOR, "{f:?}");
    }
}
