/**
 * The agent tests' "nothing leaves 127.0.0.1" rests on reading strace's output right: every
 * form strace prints an internet address in must be found, loopback or not.
 */
import { describe, expect, it } from 'vitest';
import { destinations, isLoopback } from './support/agentRun';

describe('the network trace of an agent', () => {
  it('finds TCP connects, UDP sends (DNS) and IPv6 addresses, and tells loopback apart', () => {
    const trace = [
      '101 connect(11, {sa_family=AF_INET, sin_port=htons(8455), sin_addr=inet_addr("127.0.0.1")}, 16) = -1 EINPROGRESS (Operation now in progress)',
      '101 connect(12, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT (No such file or directory)',
      '102 sendto(5, "\\x12\\x34"..., 32, MSG_NOSIGNAL, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.0.0.2")}, 16) = 32',
      '103 connect(7, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "2607:f8b0:4004::200e", &sin6_addr), sin6_scope_id=0}, 28) = -1 ENETUNREACH',
      '104 sendmsg(9, {msg_name={sa_family=AF_INET6, sin6_port=htons(8455), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "::1", &sin6_addr), sin6_scope_id=0}, msg_namelen=28}, 0) = 10',
      '105 sendto(36, "GET / HTTP/1.1\\r\\n"..., 80, MSG_NOSIGNAL, NULL, 0) = 80',
      '106 sendmmsg(20, [{msg_hdr={msg_name={sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("8.8.8.8")}, msg_namelen=16, msg_iov=[{iov_base="V\\23"..., iov_len=36}], msg_iovlen=1, msg_controllen=0, msg_flags=0}, msg_len=36}], 1, MSG_NOSIGNAL) = 1',
    ].join('\n');
    const found = destinations(trace);
    expect(found.map((d) => `${d.syscall} ${d.address}:${d.port}`)).toEqual([
      'connect 127.0.0.1:8455',
      'sendto 10.0.0.2:53',
      'connect 2607:f8b0:4004::200e:443',
      'sendmsg ::1:8455',
      'sendmmsg 8.8.8.8:53',
    ]);
    expect(found.map((d) => isLoopback(d.address))).toEqual([true, false, false, true, false]);
  });
});
