import NIOCore
import NIOHTTP1

/// A part of a backend's response as the forwarder reads it, or the sign that
/// the backend has sent nothing more for now.
enum UpstreamRead: Sendable {
    case part(HTTPClientResponsePart)
    /// The end of one read batch of the upstream channel (its
    /// `channelReadComplete`): nothing more is ready until the backend sends
    /// again, so what the writer holds must go to the client now.
    case batchEnd
}

/// Marks the end of each read batch in the response stream: the last handler
/// before the `NIOAsyncChannel`, it wraps every part and adds ``UpstreamRead/batchEnd``
/// on `channelReadComplete` when that batch brought a part.
///
/// The async stream hides when the channel's reads ended, and that is exactly
/// when a writer that gathers parts into one client write must flush, or a
/// backend that streams (Server-Sent Events, long-poll, a slow chunked body)
/// would reach the client only when its response ends.
final class ReadBatchMarker: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias InboundOut = UpstreamRead

    /// Whether a part went up since the last batch end.
    private var readInBatch = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        readInBatch = true
        context.fireChannelRead(wrapInboundOut(.part(unwrapInboundIn(data))))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if readInBatch {
            readInBatch = false
            context.fireChannelRead(wrapInboundOut(.batchEnd))
        }
        context.fireChannelReadComplete()
    }
}
