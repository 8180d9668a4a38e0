//! Placeholder until the statistics land (being written).
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct DetectorConfig {
    pub window: Duration,
    pub max_points: usize,
    pub threshold: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub t: f64,
    pub bytes: f64,
    pub mean_age: Option<f64>,
}

#[derive(Clone, Debug, Default)]
pub struct Series {
    points: Vec<Point>,
}

#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Assessment {
    pub score: f64,
    pub growth_bytes_per_second: f64,
    pub suspect: bool,
    pub trend_p_value: f64,
}

impl Series {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&mut self, point: Point, config: &DetectorConfig) {
        self.points.push(point);
        if self.points.len() > config.max_points {
            self.points.remove(0);
        }
    }
    pub fn assess(&self, _config: &DetectorConfig) -> Assessment {
        Assessment::default()
    }
}
