package proxy

import "golang.org/x/net/http2/hpack"

// The proxy writes header blocks without a dynamic table (RFC 7541): a
// field the static table holds whole is one index byte, any other is a
// literal the peer never adds to its table (its name by static index
// where the table has it), and strings go as they are, never Huffman
// coded. What the blocks lose in size (tens of bytes a call: the request
// id and the deadline change with every call anyway) the proxy gains in
// work on the path of every call: no table search, no Huffman coding, no
// encoder state per connection. The first block on a connection sets the
// peer's table to size 0, so no later SETTINGS_HEADER_TABLE_SIZE can
// leave the proxy above the peer's limit.

// hpackStart is the dynamic table size update to 0 (RFC 7541 section
// 6.3) that begins a connection's first header block.
const hpackStart = 0x20

// appendHeaderBlock appends fields to dst as a header block.
func appendHeaderBlock(dst []byte, fields []hpack.HeaderField) []byte {
	for _, f := range fields {
		dst = appendField(dst, f)
	}
	return dst
}

func appendField(dst []byte, f hpack.HeaderField) []byte {
	s, ok := staticNames[f.Name]
	if ok && !f.Sensitive {
		for _, v := range s.values {
			if v.value == f.Value {
				return appendHpackInt(dst, 0x80, 7, uint64(v.index)) // indexed (section 6.1)
			}
		}
	}
	// Literal without indexing (section 6.2.2), or never indexed (6.2.3)
	// for a sensitive field, so that no hop after the proxy indexes it.
	first := byte(0x00)
	if f.Sensitive {
		first = 0x10
	}
	if ok {
		dst = appendHpackInt(dst, first, 4, uint64(s.index))
	} else {
		dst = appendHpackString(append(dst, first), f.Name)
	}
	return appendHpackString(dst, f.Value)
}

// appendHpackInt appends i with an n-bit prefix (section 5.1), the rest
// of the first byte being first.
func appendHpackInt(dst []byte, first byte, n uint, i uint64) []byte {
	max := uint64(1)<<n - 1
	if i < max {
		return append(dst, first|byte(i))
	}
	dst = append(dst, first|byte(max))
	for i -= max; i >= 0x80; i >>= 7 {
		dst = append(dst, byte(i)|0x80)
	}
	return append(dst, byte(i))
}

// appendHpackString appends s as a string literal without Huffman coding
// (section 5.2).
func appendHpackString(dst []byte, s string) []byte {
	return append(appendHpackInt(dst, 0, 7, uint64(len(s))), s...)
}

// staticName is a name of the static table: its first index, and the
// values the table holds for it.
type staticName struct {
	index  uint8
	values []staticValue
}

type staticValue struct {
	value string
	index uint8
}

// staticNames indexes the static table (RFC 7541 Appendix A) by name.
var staticNames = func() map[string]staticName {
	m := make(map[string]staticName, len(staticTable))
	for i, f := range staticTable {
		idx := uint8(i + 1)
		s, ok := m[f[0]]
		if !ok {
			s.index = idx
		}
		s.values = append(s.values, staticValue{f[1], idx})
		m[f[0]] = s
	}
	return m
}()

// staticTable is RFC 7541 Appendix A: entry i is index i+1.
var staticTable = [...][2]string{
	{":authority", ""}, {":method", "GET"}, {":method", "POST"}, {":path", "/"},
	{":path", "/index.html"}, {":scheme", "http"}, {":scheme", "https"}, {":status", "200"},
	{":status", "204"}, {":status", "206"}, {":status", "304"}, {":status", "400"},
	{":status", "404"}, {":status", "500"}, {"accept-charset", ""}, {"accept-encoding", "gzip, deflate"},
	{"accept-language", ""}, {"accept-ranges", ""}, {"accept", ""}, {"access-control-allow-origin", ""},
	{"age", ""}, {"allow", ""}, {"authorization", ""}, {"cache-control", ""},
	{"content-disposition", ""}, {"content-encoding", ""}, {"content-language", ""}, {"content-length", ""},
	{"content-location", ""}, {"content-range", ""}, {"content-type", ""}, {"cookie", ""},
	{"date", ""}, {"etag", ""}, {"expect", ""}, {"expires", ""},
	{"from", ""}, {"host", ""}, {"if-match", ""}, {"if-modified-since", ""},
	{"if-none-match", ""}, {"if-range", ""}, {"if-unmodified-since", ""}, {"last-modified", ""},
	{"link", ""}, {"location", ""}, {"max-forwards", ""}, {"proxy-authenticate", ""},
	{"proxy-authorization", ""}, {"range", ""}, {"referer", ""}, {"refresh", ""},
	{"retry-after", ""}, {"server", ""}, {"set-cookie", ""}, {"strict-transport-security", ""},
	{"transfer-encoding", ""}, {"user-agent", ""}, {"vary", ""}, {"via", ""},
	{"www-authenticate", ""},
}
