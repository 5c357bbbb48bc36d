import Histogram
import RealModule

/// The experiment's picture, drawn as SVG text by the program itself (no
/// scripts, no web fonts): on the left the latency CDF of each strategy on a
/// logarithmic time axis, on the right the variance of `pending` across the
/// workers over the run, one line per strategy.
public enum ExperimentSVG {
    static let width = 1000.0
    static let height = 480.0
    /// Plot areas: (x, y, width, height).
    static let latencyPanel = (x: 70.0, y: 100.0, width: 390.0, height: 310.0)
    static let variancePanel = (x: 580.0, y: 100.0, width: 390.0, height: 310.0)
    static let colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]

    public static func render(_ results: [Experiment.Result], _ configuration: Experiment.Configuration) -> String {
        var svg = Canvas()
        svg.open(
            "svg",
            [
                ("xmlns", "http://www.w3.org/2000/svg"), ("width", fmt(width)), ("height", fmt(height)),
                ("viewBox", "0 0 \(fmt(width)) \(fmt(height))"), ("font-family", "sans-serif"), ("font-size", "12"),
            ]
        )
        svg.element("rect", [("width", "100%"), ("height", "100%"), ("fill", "white")])
        svg.text("The talk's requesters against each strategy", x: width / 2, y: 24, [("font-size", "17"), ("text-anchor", "middle")])
        svg.text(ExperimentReport.caption(configuration), x: width / 2, y: 44, [("text-anchor", "middle"), ("fill", "#444")])
        legend(&svg, results)
        latencyCDF(&svg, results)
        varianceOverTime(&svg, results)
        svg.close("svg")
        return svg.output
    }

    private static func legend(_ svg: inout Canvas, _ results: [Experiment.Result]) {
        let step = width / Double(max(results.count, 1))
        for (index, result) in results.enumerated() {
            let x = step * Double(index) + step / 2 - 60
            svg.element("rect", [("x", fmt(x)), ("y", "57"), ("width", "16"), ("height", "10"), ("fill", colour(index))])
            svg.text(result.strategy, x: x + 22, y: 67, [])
        }
    }

    // MARK: - Latency CDF

    private static func latencyCDF(_ svg: inout Canvas, _ results: [Experiment.Result]) {
        let panel = latencyPanel
        let answered = results.filter { $0.latency.totalCount > 0 }
        // Whole decades of milliseconds around every recorded latency.
        let lowest = answered.map { Double(max($0.latency.min, 1)) / 1000 }.min() ?? 1
        let highest = answered.map { Double(max($0.latency.max, 1)) / 1000 }.max() ?? 10
        let low = decade(below: lowest)
        var high = decade(above: highest)
        if high <= low { high = low * 10 }
        let x = { (ms: Double) in panel.x + panel.width * log10(ms / low) / log10(high / low) }
        let y = { (fraction: Double) in panel.y + panel.height * (1 - fraction) }

        frame(&svg, panel, title: "Latency CDF", xLabel: "latency (ms, log scale)", yLabel: "fraction of requests answered")
        var tick = low
        while tick <= high * 1.0001 {
            svg.gridLine(x1: x(tick), y1: panel.y, x2: x(tick), y2: panel.y + panel.height)
            svg.text(label(tick), x: x(tick), y: panel.y + panel.height + 16, [("text-anchor", "middle")])
            tick *= 10
        }
        for fraction in stride(from: 0.0, through: 1.0, by: 0.25) {
            svg.gridLine(x1: panel.x, y1: y(fraction), x2: panel.x + panel.width, y2: y(fraction))
            svg.text(StatsRendering.fixed(fraction, 2), x: panel.x - 6, y: y(fraction) + 4, [("text-anchor", "end")])
        }
        svg.gridLine(x1: panel.x, y1: y(0.99), x2: panel.x + panel.width, y2: y(0.99), dashed: true)
        svg.text("p99", x: panel.x + panel.width - 4, y: y(0.99) - 3, [("text-anchor", "end"), ("fill", "#777")])
        for (index, result) in results.enumerated() where result.latency.totalCount > 0 {
            var points: [(Double, Double)] = [(x(low), y(0))]
            let steps = 240
            for step in 0...steps {
                let ms = low * pow10(log10(high / low) * Double(step) / Double(steps))
                let fraction = result.latency.percentileAtOrBelowValue(UInt64(ms * 1000)) / 100
                points.append((x(ms), y(fraction)))
            }
            svg.polyline(points, colour: colour(index))
        }
    }

    // MARK: - Variance of pending over time

    private static func varianceOverTime(_ svg: inout Canvas, _ results: [Experiment.Result]) {
        let panel = variancePanel
        // Averaged over buckets, so the lines show the trend rather than every sample.
        let buckets = 100
        let duration = max(results.flatMap { $0.samples.map(\.seconds) }.max() ?? 1, 0.001)
        let series: [[(seconds: Double, variance: Double)]] = results.map { result in
            var sums = [Double](repeating: 0, count: buckets)
            var counts = [Int](repeating: 0, count: buckets)
            for sample in result.samples {
                let bucket = min(buckets - 1, Int(sample.seconds / duration * Double(buckets)))
                sums[bucket] += sample.variance
                counts[bucket] += 1
            }
            var points: [(seconds: Double, variance: Double)] = []
            for bucket in 0..<buckets where counts[bucket] > 0 {
                let seconds = (Double(bucket) + 0.5) * duration / Double(buckets)
                points.append((seconds, sums[bucket] / Double(counts[bucket])))
            }
            return points
        }
        let highest = series.flatMap { $0.map(\.variance) }.max() ?? 1
        let top = niceCeiling(highest)
        let x = { (seconds: Double) in panel.x + panel.width * seconds / duration }
        let y = { (variance: Double) in panel.y + panel.height * (1 - variance / top) }

        frame(&svg, panel, title: "Variance of pending across the workers", xLabel: "time in the run (s)", yLabel: "variance of pending")
        let every = niceCeiling(duration / 5)
        for seconds in stride(from: 0, through: duration, by: every) {
            svg.text(label(seconds), x: x(seconds), y: panel.y + panel.height + 16, [("text-anchor", "middle")])
        }
        for step in 0...4 {
            let variance = top * Double(step) / 4
            svg.gridLine(x1: panel.x, y1: y(variance), x2: panel.x + panel.width, y2: y(variance))
            svg.text(label(variance), x: panel.x - 6, y: y(variance) + 4, [("text-anchor", "end")])
        }
        for (index, points) in series.enumerated() where !points.isEmpty {
            svg.polyline(points.map { (x($0.seconds), y($0.variance)) }, colour: colour(index))
        }
    }

    // MARK: - Drawing helpers

    private static func frame(
        _ svg: inout Canvas,
        _ panel: (x: Double, y: Double, width: Double, height: Double),
        title: String,
        xLabel: String,
        yLabel: String
    ) {
        svg.element(
            "rect",
            [("x", fmt(panel.x)), ("y", fmt(panel.y)), ("width", fmt(panel.width)), ("height", fmt(panel.height)),
             ("fill", "none"), ("stroke", "#333")]
        )
        svg.text(title, x: panel.x + panel.width / 2, y: panel.y - 8, [("text-anchor", "middle"), ("font-size", "14")])
        svg.text(xLabel, x: panel.x + panel.width / 2, y: panel.y + panel.height + 36, [("text-anchor", "middle")])
        let middle = panel.y + panel.height / 2
        svg.text(yLabel, x: panel.x - 46, y: middle, [("text-anchor", "middle"), ("transform", "rotate(-90 \(fmt(panel.x - 46)) \(fmt(middle)))")])
    }

    private static func colour(_ index: Int) -> String { colours[index % colours.count] }

    private static func decade(below value: Double) -> Double {
        var d = 1.0
        while d > value { d /= 10 }
        while d * 10 <= value { d *= 10 }
        return d
    }

    private static func decade(above value: Double) -> Double {
        let d = decade(below: value)
        return d >= value ? d : d * 10
    }

    /// 1, 2 or 5 times a power of ten, at or above `value`.
    private static func niceCeiling(_ value: Double) -> Double {
        guard value > 0 else { return 1 }
        let d = decade(below: value)
        for m in [1.0, 2.0, 5.0, 10.0] where d * m >= value { return d * m }
        return d * 10
    }

    private static func label(_ value: Double) -> String {
        if value >= 10 || value == value.rounded() { return StatsRendering.fixed(value, 0) }
        return value >= 1 ? StatsRendering.fixed(value, 1) : StatsRendering.fixed(value, 3)
    }
}

/// SVG text under construction.
private struct Canvas {
    var output = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"

    mutating func open(_ name: String, _ attributes: [(String, String)]) {
        output += "<\(name)\(render(attributes))>\n"
    }

    mutating func close(_ name: String) {
        output += "</\(name)>\n"
    }

    mutating func element(_ name: String, _ attributes: [(String, String)]) {
        output += "<\(name)\(render(attributes))/>\n"
    }

    mutating func text(_ content: String, x: Double, y: Double, _ attributes: [(String, String)]) {
        output += "<text x=\"\(fmt(x))\" y=\"\(fmt(y))\"\(render(attributes))>\(escape(content))</text>\n"
    }

    mutating func gridLine(x1: Double, y1: Double, x2: Double, y2: Double, dashed: Bool = false) {
        element(
            "line",
            [("x1", fmt(x1)), ("y1", fmt(y1)), ("x2", fmt(x2)), ("y2", fmt(y2)), ("stroke", dashed ? "#999" : "#ddd")]
                + (dashed ? [("stroke-dasharray", "4 3")] : [])
        )
    }

    mutating func polyline(_ points: [(Double, Double)], colour: String) {
        let text = points.map { "\(fmt($0.0)),\(fmt($0.1))" }.joined(separator: " ")
        element("polyline", [("points", text), ("fill", "none"), ("stroke", colour), ("stroke-width", "2")])
    }

    private func render(_ attributes: [(String, String)]) -> String {
        attributes.map { " \($0.0)=\"\(escape($0.1))\"" }.joined()
    }

    private func escape(_ text: String) -> String {
        var out = ""
        for character in text {
            switch character {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            default: out.append(character)
            }
        }
        return out
    }
}

/// A coordinate with two decimals.
private func fmt(_ value: Double) -> String { StatsRendering.fixed(value, 2) }

private func log10(_ value: Double) -> Double { Double.log10(value) }
private func pow10(_ value: Double) -> Double { Double.exp10(value) }
