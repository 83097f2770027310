import { useState } from 'react';

import LiveFeed from './components/LiveFeed.jsx';
import { useCentrifugeState } from './herald.jsx';

export default function App({ hub }) {
  const connection = useCentrifugeState();
  const [shown, setShown] = useState(true);
  return (
    <>
      <header>
        <h1>Herald + React</h1>
        <span className={`pill ${connection}`}>WebSocket: <b id="ws-state">{connection}</b></span>
        <button id="toggle" type="button" onClick={() => setShown(!shown)}>{shown ? 'Unmount the feed' : 'Mount the feed'}</button>
      </header>
      {shown
        ? <LiveFeed channel="live:updates" hub={hub} />
        : <p className="hint">Unmounted: the EventSource is closed and the subscription is gone, on the server too.</p>}
    </>
  );
}
