// swift-tools-version:6.1
import PackageDescription

let strictSwift6: [SwiftSetting] = [
    .swiftLanguageMode(.v6)
]

let package = Package(
    name: "swift-balancer",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "BalancerCore", targets: ["BalancerCore"]),
        .library(name: "BalancerServer", targets: ["BalancerServer"]),
        .executable(name: "balancer", targets: ["balancer"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-async-algorithms.git", from: "1.1.4"),
        .package(url: "https://github.com/apple/swift-nio-extras.git", from: "1.35.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-numerics.git", from: "1.1.1"),
    ],
    targets: [
        // The talk's pieces: Request, Worker, Pool, Balancer. Standard library,
        // Synchronization and swift-collections only: no NIO, no Foundation.
        .target(
            name: "BalancerCore",
            dependencies: [
                .product(name: "DequeModule", package: "swift-collections")
            ],
            swiftSettings: strictSwift6
        ),
        // The service: HTTP on SwiftNIO, routes, job kinds, configuration.
        .target(
            name: "BalancerServer",
            dependencies: [
                "BalancerCore",
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOExtras", package: "swift-nio-extras"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "AsyncAlgorithms", package: "swift-async-algorithms"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "RealModule", package: "swift-numerics"),
            ],
            swiftSettings: strictSwift6
        ),
        // The executable: a thin command line over the two libraries.
        .executableTarget(
            name: "balancer",
            dependencies: [
                "BalancerCore",
                "BalancerServer",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strictSwift6
        ),
        .testTarget(
            name: "BalancerCoreTests",
            dependencies: ["BalancerCore"],
            swiftSettings: strictSwift6
        ),
        .testTarget(
            name: "BalancerServerTests",
            dependencies: [
                "BalancerServer",
                "BalancerCore",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strictSwift6
        ),
    ]
)
